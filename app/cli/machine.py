"""`tunesmith models | gpu`: the models this machine has, and its NVIDIA cards."""

from __future__ import annotations

import sys

from app.cli.output import gib_or_unknown, maybe, print_table, yes
from app.core.units import gib


def add_commands(sub) -> None:
    models = sub.add_parser("models", help="list the demo model, cached and recent models")
    models.set_defaults(func=cmd_models)

    gpu = sub.add_parser("gpu", help="show this machine's NVIDIA GPUs and what they can do for training")
    gpu.add_argument("--list", action="store_true", help="list every card in the catalogue (for plan --gpu)")
    gpu.set_defaults(func=cmd_gpu)


def cmd_models(args) -> int:
    from app.core.models.resolve import list_models  # here: each command loads its own part of the engine (the window starts without them)

    table = [("MODEL", "SOURCE", "ARCHITECTURE", "PARAMS", "SIZE", "PATH")]
    for m in list_models():
        params = f"{m.parameters / 1e6:,.0f}M" if m.parameters else "?"
        size = gib(m.size_bytes) if m.size_bytes else "-"
        table.append((m.name, m.kind, m.architecture, params, size, str(m.path)))
    print_table(table)
    return 0


def cmd_gpu(args) -> int:
    from app.core.plan.cards import card_catalog, detected_card  # at call time: tests replace detected_card there
    from app.gpu.nvml import detect_gpus, torch_cuda  # at call time: tests replace detect_gpus there

    if args.list:
        table = [("CARD", "MEMORY", "COMPUTE", "BF16", "FLASH-ATTN 2", "ALSO CALLED")]
        for card in card_catalog():
            table.append((card.name, f"{card.memory_gib:.1f} GiB", card.capability_text, yes(card.bf16),
                          yes(card.flash_attention_2), ", ".join(card.aliases)))
        print_table(table)
        return 0
    report = detect_gpus()
    if not report.available:
        print(f"NVML: {report.message}")
    else:
        print(f"NVIDIA driver {report.driver}")
        for g in report.gpus:
            print(f"GPU {g.index}: {g.name}")
            print(f"  memory       total {gib_or_unknown(g.total_bytes)}, free {gib_or_unknown(g.free_bytes)}, used {gib_or_unknown(g.used_bytes)}"
                  + (f", reserved {gib_or_unknown(g.reserved_bytes)}" if g.reserved_bytes is not None else ""))
            print(f"  utilisation  {maybe(g.utilization_pct, '%')}")
            print(f"  temperature  {maybe(g.temperature_c, ' C')}")
            for note in g.notes:
                print(f"  note         {note}")
            card = detected_card(g.index)
            if card is not None:
                print(f"  training     compute capability {card.capability_text}, bf16 {yes(card.bf16)}, "
                      f"FlashAttention-2 {yes(card.flash_attention_2)}"
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
