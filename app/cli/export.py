"""`tunesmith export`: write a run out as its adapter, a merged model or a GGUF file (with an
Ollama Modelfile)."""

from __future__ import annotations

from app.cli.output import info
from app.core.export.quantize import ALL_QUANTS


def add_commands(sub) -> None:
    export = sub.add_parser("export", help="export a run as an adapter, a merged model or a GGUF file")
    export.add_argument("run", help="run id (or a unique part of it), run folder, checkpoint or adapter folder")
    export.add_argument("--format", required=True, choices=("adapter", "merged", "gguf"),
                        help="adapter: the PEFT adapter; merged: base + adapter in 16-bit safetensors; "
                             "gguf: one file for llama.cpp/Ollama, with a Modelfile")
    export.add_argument("--dtype", choices=("auto", "bf16", "f16", "f32"), default="auto",
                        help="merged: precision of the merged weights (default auto: f16, which keeps the "
                             "adapter's small changes better, unless the model's activations come near f16's "
                             "range, then bf16; gguf files take theirs from --quant)")
    export.add_argument("--quant", choices=ALL_QUANTS, default="f16", metavar="TYPE",
                        help="GGUF type: " + ", ".join(ALL_QUANTS) + " (default f16; q8_0 is half the size; "
                             "q4_k_m, q5_k_m and q6_k need llama-cpp-python: pip install 'tunesmith[gguf]')")
    export.add_argument("--merge-into", choices=("trained", "original"), default="trained",
                        help="merged and gguf: trained (default) merges into the weights the adapter was "
                             "trained against (a QLoRA run's NF4-rounded ones: the model you tested); "
                             "original into the base model's own 16-bit weights")
    export.add_argument("--out", required=True, help="folder to create")
    export.add_argument("--force", action="store_true", help="replace --out if it holds an earlier export")
    export.add_argument("--pre-tokenizer", default="", metavar="NAME",
                        help="gguf: llama.cpp's pre-tokenizer name, for a tokenizer Tunesmith cannot identify")
    export.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code")
    export.add_argument("--download", action="store_true",
                        help="download the base model from the Hugging Face Hub if it is not on this machine")
    export.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from app.core.export.exporter import ExportOptions, export_run  # lazy: imports gguf (heavy) only when used
    from app.core.export.usage import how_to_run  # here: each command loads its own part of the engine (the window starts without them)

    options = ExportOptions(dtype=args.dtype, quant=args.quant, force=args.force, trust_remote_code=args.trust_remote_code,
                            pre_tokenizer=args.pre_tokenizer, merge_into=args.merge_into, download=args.download)
    result = export_run(args.run, args.format, args.out, options, progress=info)
    print(f"Wrote {result.out_dir} ({result.bytes / 2**20:,.1f} MiB):")
    for name in result.files:
        print(f"  {name}")
    if "max_logit_diff" in result.checks:
        print(f"Merged logits vs base + adapter: largest difference {result.checks['max_logit_diff']:.3g}, "
              f"same next token at {result.checks['top_token_agreement']:.1%} of positions")
    if "logit_check" in result.checks:
        print(f"Merged logits vs base + adapter: {result.checks['logit_check']}")
    if "gguf_tensors" in result.checks:
        print(f"GGUF read back: {result.checks['gguf_tensors']} tensors match the merged model "
              f"(largest difference {result.checks['gguf_max_abs_diff']:.3g})")
    print("Run it:")
    for what, command in how_to_run(result.format, result.out_dir, result.files):
        print(f"  {what}: {command}")
    return 0
