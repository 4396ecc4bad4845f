"""The command line: `tunesmith train|resume|runs|plan|check-data|models|gpu|demo|gui` (and
`chat`, `export` from app.cli.chat).

A thin face over app.core. User errors print one line on stderr and exit 2 (`--debug` shows the
traceback); a failed run exits 1; Ctrl-C during training stops cleanly with a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import fields

from app import __version__
from app.cli import chat as cli_chat
from app.core.config import TrainConfig, field_help
from app.cli.progress import Progress, install_stop_handler, report_end, run_with_progress
from app.core.errors import UserError

QUANTIZE_CHOICES = ("auto", "4bit", "none")  # planner.QUANTIZE_CHOICES, without importing the planner here

EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        from app.gui.application import run_gui

        return run_gui()
    _quiet_libraries(args.debug)
    try:
        return args.func(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"tunesmith: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ntunesmith: aborted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune an open LLM with QLoRA.")
    parser.add_argument("--version", action="version", version=f"tunesmith {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train a LoRA adapter on your data")
    _add_train_options(train)
    train.set_defaults(func=cmd_train)

    plan = sub.add_parser("plan", help="show the memory plan for a model, data and VRAM preset (no weights load)")
    plan.add_argument("--model", default="demo", help=_help("model"))
    plan.add_argument("--data", default="", help="training data to fit the sequence length to (optional)")
    plan.add_argument("--preset", default="auto", help=_help("preset"))
    plan.add_argument("--gpu", default="", metavar="NAME", help=_help("gpu"))
    plan.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="auto", help=_help("quantize"))
    _add_kernel_options(plan)
    for name, flag, kind in [("rank", "--rank", int), ("seq_len", "--seq-len", int), ("micro_batch", "--batch", int),
                             ("grad_accum", "--grad-accum", int), ("epochs", "--epochs", float)]:
        default = TrainConfig.__dataclass_fields__[name].default
        plan.add_argument(flag, dest=name, type=kind, default=default, help=_help(name))
    for name in ("grad_checkpointing", "packing"):
        plan.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=None,
                          help=_help(name))
    plan.add_argument("--skip-bad", action="store_true", help=_help("skip_bad"))
    plan.add_argument("--json", action="store_true", help="print the plan and breakdown as JSON")
    plan.set_defaults(func=cmd_plan)

    gui = sub.add_parser("gui", help="open the desktop app (also what plain `tunesmith` does)")
    gui.add_argument("--smoke", action="store_true",
                     help="open the window, print the ms from start to shown, and exit")
    gui.set_defaults(func=cmd_gui)

    resume = sub.add_parser("resume", help="continue a stopped or interrupted run")
    resume.add_argument("run", help="run id (or a unique part of it) or run folder")
    resume.add_argument("--trust-remote-code", action="store_true",
                        help="needed again for a run started with it: the model's own code runs")
    resume.add_argument("--allow-pickle", action="store_true",
                        help="needed again for a run started with it: pickle weights load")
    resume.set_defaults(func=cmd_resume)

    runs = sub.add_parser("runs", help="list training runs")
    runs.set_defaults(func=cmd_runs)

    check = sub.add_parser("check-data", help="validate a dataset file and show its token lengths")
    check.add_argument("file")
    check.add_argument("--model", default="demo", help="tokenizer to measure with (default: demo)")
    check.add_argument("--seq-len", type=int, default=1024, help="report rows longer than this")
    check.add_argument("--trust-remote-code", action="store_true", help=_help("trust_remote_code"))
    check.set_defaults(func=cmd_check_data)

    models = sub.add_parser("models", help="list the demo model, cached and recent models")
    models.set_defaults(func=cmd_models)

    gpu = sub.add_parser("gpu", help="show this machine's NVIDIA GPUs and what they can do for training")
    gpu.add_argument("--list", action="store_true", help="list every card in the catalogue (for plan --gpu)")
    gpu.set_defaults(func=cmd_gpu)

    demo = sub.add_parser("demo", help="train the demo model on the sample data and compare answers")
    demo.add_argument("--max-steps", type=int, default=None, help="train fewer steps (quick look)")
    demo.set_defaults(func=cmd_demo)
    cli_chat.add_commands(sub)
    return parser


_FLAGS = {"micro_batch": "--batch", "val_data": "--val-data"}
_SKIP = {"model", "data", "quantize", "warmup_ratio", "max_grad_norm", "weight_decay", "lora_dropout", "lora_alpha",
         "eval_every", "save_every", "seed", "attention", "loss_kernel"}


def _add_kernel_options(parser: argparse.ArgumentParser) -> None:
    from app.core.kernel_choice import ATTENTION_CHOICES, LOSS_CHOICES

    parser.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto", help=_help("attention"))
    parser.add_argument("--loss-kernel", dest="loss_kernel", choices=LOSS_CHOICES, default="auto",
                        help=_help("loss_kernel"))


def _help(name: str) -> str:
    return field_help(TrainConfig, name).replace("%", "%%")


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help=_help("model"))
    parser.add_argument("--data", required=True, help=_help("data"))
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="auto", help=_help("quantize"))
    for f in fields(TrainConfig):
        if f.name in _SKIP:
            continue
        flag = _FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        help_text = f.metadata.get("help", "").replace("%", "%%")
        if str(f.type) == "bool | None":  # --grad-checkpointing / --no-grad-checkpointing, --packing ...
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
        else:
            kind = {"int | None": int, "float": float, "int": int}.get(str(f.type), str)
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_text)
    for name in ("eval_every", "save_every", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=int,
                            default=TrainConfig.__dataclass_fields__[name].default, help=_help(name))
    _add_kernel_options(parser)


# -- commands ------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from app.core.trainer import run_training

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    config = TrainConfig(**values)
    return run_with_progress(lambda on_event, stop: run_training(config, on_event, stop))


def cmd_plan(args) -> int:
    import json

    from app.core.memory import COMPONENTS, gib
    from app.core.plan_preview import preview_plan

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    preview = preview_plan(TrainConfig(**values))
    if args.json:
        print(json.dumps(preview.to_dict(), indent=2))
        return 0
    facts, plan, budget = preview.model.facts, preview.plan, preview.budget
    print(f"Model   {preview.model.name} ({preview.model.source}): {facts.total_params / 1e9:.2f}B parameters, "
          f"{facts.layers} layers, hidden {facts.hidden}, vocabulary {facts.vocab:,}")
    print(f"Budget  {budget.preset.id}: {gib(budget.usable_bytes)} usable ({budget.source})")
    if budget.card:
        card = budget.card
        print(f"Card    {card.name}: compute capability {card.capability_text}, bf16 {_yes(card.bf16)}, "
              f"FlashAttention-2 {_yes(card.flash_attention_2)} ({card.source})")
    if preview.stats:
        s = preview.stats
        print(f"Data    {s.count} examples, tokens median {s.median}, p95 {s.p95}, p99 {s.p99}, max {s.max}")
    if preview.tokenizer_note:
        print(f"Note    {preview.tokenizer_note}")
    print()
    rows = [("SETTING", "VALUE", "WHY")]
    for name, value in [("quantize", plan.quantize), ("seq_len", plan.seq_len), ("rank", plan.rank), ("grad_checkpointing",
                        "on" if plan.grad_checkpointing else "off"), ("micro_batch", plan.micro_batch),
                        ("grad_accum", plan.grad_accum), ("batching", plan.batching),
                        ("compute_dtype", plan.compute_dtype), ("attention", plan.attention), ("loss", plan.loss),
                        ("optimizer", plan.optimizer), ("total_steps", plan.total_steps or "-")]:
        rows.append((name, value, plan.reasons.get(name, "")))
    _print_table(rows)
    print()
    rows = [("MEMORY", "PREDICTED", "WHAT")]
    for name, label, what in COMPONENTS:
        if name == "runtime_overhead" and budget.device != "cuda":
            continue  # no CUDA context on the CPU
        rows.append((label, gib(plan.breakdown.get(name, 0)),
                     what.format(lora_params=plan.breakdown.get("lora_params", 0))))
    rows.append(("peak", gib(plan.predicted_peak_bytes), f"of {gib(budget.usable_bytes)} usable"))
    _print_table(rows)
    return 0


def cmd_gui(args) -> int:
    from app.gui.application import run_gui

    return run_gui(smoke=args.smoke)


def cmd_resume(args) -> int:
    from app.core.trainer import resume_training

    return run_with_progress(lambda on_event, stop: resume_training(
        args.run, on_event, stop, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle))


def cmd_runs(args) -> int:
    from app.core.runs import list_runs

    rows = list_runs()
    if not rows:
        print("No runs yet. Start one with `tunesmith train --data FILE` or `tunesmith demo`.")
        return 0
    table = [("RUN", "STATUS", "STEPS", "LOSS", "EVAL", "MODEL", "DATA")]
    for r in rows:
        table.append((r.id, r.status, f"{r.step}/{r.total_steps}", _num(r.last_loss), _num(r.eval_loss),
                      _short(r.model), _short(os.path.basename(r.data))))
    _print_table(table)
    return 0


def cmd_check_data(args) -> int:
    from app.core.data.stats import count_over, length_stats
    from app.core.data.tokenize import ensure_chat_template, tokenize_examples
    from app.core.data.validate import check_file
    from app.core.models import load_tokenizer, resolve_model

    report = check_file(args.file)
    problems = list(report.problems)
    print(f"{report.file}")
    print(f"  format     {report.format_label}")
    lengths: list[int] = []
    if report.examples:
        model = resolve_model(args.model, args.trust_remote_code, progress=_info)
        tokenizer = load_tokenizer(model, args.trust_remote_code)
        ensure_chat_template(tokenizer)
        tokenized = tokenize_examples(tokenizer, report.examples, report.file)
        problems += tokenized.problems
        lengths = [len(e.input_ids) for e in tokenized.examples]
    bad_lines = len({(p.line, p.file) for p in problems})
    print(f"  rows       {report.rows} ({report.rows - bad_lines} usable, {bad_lines} with problems)")
    if lengths:
        s = length_stats(lengths)
        print(f"  tokens     min {s.min}, median {s.median}, p95 {s.p95}, max {s.max} "
              f"(tokenizer of {model.name})")
        over = count_over(lengths, args.seq_len)
        print(f"  truncated  {over} row{'s' * (over != 1)} longer than {args.seq_len} tokens")
    if problems:
        print(f"\n{len(problems)} problem{'s' * (len(problems) != 1)}:")
        for problem in sorted(problems, key=lambda p: (p.line or 0)):
            print(f"  {problem}")
        print("\nFix these rows, or train with --skip-bad to leave them out.", file=sys.stderr)
        return EXIT_USER_ERROR
    print("  OK: every row is usable")
    return 0


def cmd_models(args) -> int:
    from app.core.models import list_models

    table = [("MODEL", "SOURCE", "ARCHITECTURE", "PARAMS", "SIZE", "PATH")]
    for m in list_models():
        params = f"{m.parameters / 1e6:,.0f}M" if m.parameters else "?"
        size = f"{m.size_bytes / 2**30:.2f} GiB" if m.size_bytes else "-"
        table.append((m.name, m.kind, m.architecture, params, size, m.path))
    _print_table(table)
    return 0


def cmd_gpu(args) -> int:
    from app.core.cards import card_catalog, detected_card
    from app.gpu.nvml import detect_gpus, torch_cuda

    if args.list:
        table = [("CARD", "MEMORY", "COMPUTE", "BF16", "FLASH-ATTN 2", "ALSO CALLED")]
        for card in card_catalog():
            table.append((card.name, f"{card.memory_gib:.1f} GiB", card.capability_text, _yes(card.bf16),
                          _yes(card.flash_attention_2), ", ".join(card.aliases)))
        _print_table(table)
        return 0
    report = detect_gpus()
    if not report.available:
        print(f"NVML: {report.message}")
    else:
        print(f"NVIDIA driver {report.driver}")
        for g in report.gpus:
            print(f"GPU {g.index}: {g.name}")
            print(f"  memory       total {_gib(g.total_bytes)}, free {_gib(g.free_bytes)}, used {_gib(g.used_bytes)}"
                  + (f", reserved {_gib(g.reserved_bytes)}" if g.reserved_bytes is not None else ""))
            print(f"  utilisation  {_maybe(g.utilization_pct, '%')}")
            print(f"  temperature  {_maybe(g.temperature_c, ' C')}")
            for note in g.notes:
                print(f"  note         {note}")
            card = detected_card(g.index)
            if card is not None:
                print(f"  training     compute capability {card.capability_text}, bf16 {_yes(card.bf16)}, "
                      f"FlashAttention-2 {_yes(card.flash_attention_2)}"
                      + ("" if card.capability >= (7, 0) else " - too old for 4-bit training (needs 7.0+)"))
    if "torch" not in sys.modules and not report.available:
        print("torch: not asked (no NVIDIA driver); training runs on the CPU, slowly")
        return 0
    view = torch_cuda()
    if view.available:
        for i, d in enumerate(view.devices):
            print(f"torch: cuda:{i} {d['name']}, compute capability {d['capability']}, "
                  f"bf16 {'yes' if d['bf16'] else 'no'} ({view.message})")
    else:
        print(f"torch: CUDA not available ({view.message}); training runs on the CPU, slowly")
    return 0


def cmd_demo(args) -> int:
    from app.core.demo import DEMO_QUESTION, demo_config, run_demo

    config = demo_config()
    if args.max_steps:
        config.max_steps = args.max_steps
    progress = Progress()
    stop = install_stop_handler(progress)
    started = time.monotonic()
    result = run_demo(progress, stop, config)
    progress.close()
    if result.run.status != "finished":
        return report_end(result.run)
    minutes = (time.monotonic() - started) / 60
    print(f"\nTrained {result.run.step} steps in {minutes:.1f} min. Mean loss of the first 10 steps "
          f"{sum(result.first_losses) / len(result.first_losses):.3f}, of the last 10 "
          f"{sum(result.last_losses) / len(result.last_losses):.3f} ({result.loss_drop:.0%} lower).")
    print(f"\nQuestion: {DEMO_QUESTION}\n")
    print(f"Base model:\n  {result.base_answer}\n")
    print(f"Tuned adapter:\n  {result.tuned_answer}\n")
    print(f"Adapter saved in {result.run.adapter_dir}")
    return 0


# -- helpers -------------------------------------------------------------------------------------
def _quiet_libraries(debug: bool) -> None:
    if debug:
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _gib(value) -> str:
    return f"{value / 2**30:.2f} GiB" if isinstance(value, int) else "?"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _maybe(value, unit: str) -> str:
    return f"{value}{unit}" if value is not None else "not reported"


def _info(message: str) -> None:
    print(message, file=sys.stderr)


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
