"""`tunesmith chat` and `tunesmith export`: talk to a trained adapter in the terminal, and write it
out as an adapter, a merged model or a GGUF file (with an Ollama Modelfile)."""

from __future__ import annotations

import sys
import threading
from dataclasses import fields

from app.core.chat import GenerationSettings

CHAT_COMMANDS = ("/base  switch the adapter off or on", "/compare  answer the last question with both",
                 "/clear  forget the conversation", "/save FILE  append the conversation to a JSONL dataset",
                 "/quit  leave (or Ctrl-D)")


def add_commands(sub) -> None:
    chat = sub.add_parser("chat", help="talk to a trained adapter (multi-turn, or one answer with --prompt)")
    chat.add_argument("run", help="run id (or a unique part of it), run folder, checkpoint or PEFT adapter folder")
    chat.add_argument("--prompt", help="answer this one message and exit")
    chat.add_argument("--base", action="store_true", help="answer with the base model (adapter off)")
    chat.add_argument("--compare", action="store_true", help="with --prompt: print the tuned and the base answer")
    for f in fields(GenerationSettings):
        flag = "--system" if f.name == "system_prompt" else "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"].replace("%", "%%")
        if f.name == "stop":
            chat.add_argument(flag, action="append", default=[], help=help_text + " Repeat for several.")
        else:
            chat.add_argument(flag, dest=f.name, type=type(f.default), default=f.default, help=help_text)
    chat.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (only for "
                      "models you trust)")
    chat.set_defaults(func=cmd_chat)

    export = sub.add_parser("export", help="export a run as an adapter, a merged model or a GGUF file")
    export.add_argument("run", help="run id (or a unique part of it), run folder, checkpoint or adapter folder")
    export.add_argument("--format", required=True, choices=("adapter", "merged", "gguf"),
                        help="adapter: the PEFT adapter; merged: base + adapter in 16-bit safetensors; "
                             "gguf: one file for llama.cpp/Ollama, with a Modelfile")
    export.add_argument("--dtype", choices=("bf16", "f16", "f32"), default="bf16",
                        help="precision of the merged weights (default bf16)")
    export.add_argument("--quant", choices=("f16", "q8_0", "bf16", "f32"), default="f16",
                        help="GGUF tensor type (default f16; q8_0 is half the size)")
    export.add_argument("--out", required=True, help="folder to create")
    export.add_argument("--force", action="store_true", help="replace --out if it holds an earlier export")
    export.add_argument("--pre-tokenizer", default="", metavar="NAME",
                        help="gguf: llama.cpp's pre-tokenizer name, for a tokenizer Tunesmith cannot identify")
    export.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code")
    export.set_defaults(func=cmd_export)


def cmd_chat(args) -> int:
    from app.core.chat import load_chat

    settings = GenerationSettings(system_prompt=args.system_prompt, temperature=args.temperature,
                                  top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                  repetition_penalty=args.repetition_penalty, stop=args.stop)
    chat = load_chat(args.run, args.trust_remote_code, progress=_info)
    if args.prompt is not None:
        messages = [{"role": "user", "content": args.prompt}]
        if args.compare:
            print("Tuned adapter:")
            _answer(chat, messages, settings, adapter=True)
            print("\nBase model:")
            _answer(chat, messages, settings, adapter=False)
        else:
            _answer(chat, messages, settings, adapter=not args.base)
        return 0
    return _conversation(chat, settings, adapter=not args.base)


def cmd_export(args) -> int:
    from app.core.export import export_run

    result = export_run(args.run, args.format, args.out, dtype=args.dtype, quant=args.quant, force=args.force,
                        progress=_info, trust_remote_code=args.trust_remote_code, pre_tokenizer=args.pre_tokenizer)
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
    return 0


def _conversation(chat, settings: GenerationSettings, adapter: bool) -> int:
    from app.core.chat import save_conversation
    from app.core.errors import UserError

    messages: list[dict] = []
    print(f"Chatting with {chat.source.label}. " + "; ".join(CHAT_COMMANDS) + ".", file=sys.stderr)
    while True:
        try:
            line = input("\nyou> " if adapter else "\nyou (base model)> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command == "/quit":
            return 0
        if command == "/base":
            adapter = not adapter
            print("Adapter " + ("on." if adapter else "off: the base model answers."))
        elif command == "/clear":
            messages = []
            print("Conversation cleared.")
        elif command == "/save":
            try:
                print(f"Appended to {save_conversation(rest.strip() or 'conversations.jsonl', messages, settings.system_prompt)}")
            except UserError as err:
                print(f"tunesmith: {err}", file=sys.stderr)
        elif command == "/compare":
            asked = [m for m in messages if m["role"] == "user"]
            if not asked:
                print("Ask something first.")
                continue
            history = messages[:max(i for i, m in enumerate(messages) if m["role"] == "user") + 1]
            for label, on in (("tuned", True), ("base", False)):
                print(f"{label}> ", end="", flush=True)
                _answer(chat, history, settings, adapter=on, lead="")
        else:
            messages.append({"role": "user", "content": line})
            text = _answer(chat, messages, settings, adapter, lead="bot> " if adapter else "base> ")
            messages.append({"role": "assistant", "content": text})


def _answer(chat, messages: list[dict], settings: GenerationSettings, adapter: bool, lead: str = "") -> str:
    """Stream one answer to stdout; Ctrl-C stops the answer, not the program."""
    stop = threading.Event()
    text = ""
    print(lead, end="", flush=True)
    try:
        for piece in chat.stream(messages, settings, adapter=adapter, stop=stop):
            text += piece
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        stop.set()
        print(" [stopped]", end="")
    print()
    last = chat.last
    print(f"({last.tokens} tokens, {last.tokens_per_s:.1f} tokens/s{', stopped' if last.stopped else ''})",
          file=sys.stderr)
    return text


def _info(message: str) -> None:
    print(message, file=sys.stderr)
