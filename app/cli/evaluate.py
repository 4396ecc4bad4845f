"""`tunesmith eval`: the before/after report of a run, a checkpoint or any PEFT adapter, again or
for the first time: held-out loss, answers side by side, forgetting probes, and the user's own
multiple-choice questions."""

from __future__ import annotations

from app.cli.output import info


def add_commands(sub) -> None:
    evaluate = sub.add_parser("eval", help="judge a run against its base model: held-out loss, answers side by side, "
                                           "forgetting probes, multiple choice (writes report.md)")
    evaluate.add_argument("run", help="run id (or a unique part of it), run folder, checkpoint or PEFT adapter folder")
    evaluate.add_argument("--data", default="", metavar="FILE",
                          help="judge on every example of this file (same formats as training) instead of the run's "
                               "held-out examples; needed for an adapter outside a run")
    evaluate.add_argument("--probes", default="", metavar="FILE",
                          help="your own probe file, scored beside the built-in general questions: JSONL, one "
                               '{"prompt": ..., "answer": ..., "match": "number|word|exact|regex|no_refusal"} a line')
    evaluate.add_argument("--choices", default="", metavar="FILE",
                          help='multiple-choice questions, JSONL: {"question": ..., "choices": [...], "answer": INDEX}; '
                               "base and tuned pick by log-likelihood; accuracy with a 95 %% interval")
    evaluate.add_argument("--parts", default="all", metavar="PARTS",
                          help="which parts: any of loss, answers, probes (comma-separated), all (default) or off "
                               "(with --choices: only the multiple choice)")
    evaluate.add_argument("--out", default="", metavar="DIR",
                          help="write report.md and report.json here (default: the run's folder; report-CHECKPOINT "
                               "for a checkpoint; the adapter's folder for an adapter outside a run)")
    evaluate.add_argument("--trust-remote-code", action="store_true",
                          help="allow the model's own code")
    evaluate.add_argument("--download", action="store_true",
                          help="download the base model from the Hugging Face Hub if it is not on this machine")
    evaluate.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from app.core.eval.report import ReportRequest, parse_parts  # here: each command loads its own part of the engine (the window starts without them)
    from app.core.eval.run_report import make_report  # here: each command loads its own part of the engine (the window starts without them)

    request = ReportRequest(parse_parts(args.parts, "--parts"), args.probes, args.choices, args.data, out=args.out,
                            trust_remote_code=args.trust_remote_code, download=args.download)
    report, json_path, md_path = make_report(args.run, request, progress=info)
    for line in report["lines"]:
        print(line[:1].upper() + line[1:])
    for note in report["notes"]:
        print(f"Note: {note}")
    print(f"Report: {md_path} and {json_path.name} ({report['seconds']['total']:.1f} s)")
    return 0
