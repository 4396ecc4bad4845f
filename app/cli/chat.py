"""`tunesmith chat`: talk to a trained adapter in the terminal (multi-turn, or one answer)."""

from __future__ import annotations

import sys
import threading
from dataclasses import fields

from app.cli.output import info
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
    chat.add_argument("--download", action="store_true",
                      help="download the base model from the Hugging Face Hub if it is not on this machine")
    chat.set_defaults(func=cmd_chat)


def cmd_chat(args) -> int:
    from app.core.chat import load_chat  # here: each command loads its own part of the engine (the window starts without them)

    settings = GenerationSettings(system_prompt=args.system_prompt, temperature=args.temperature,
                                  top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                  repetition_penalty=args.repetition_penalty, stop=args.stop)
    chat = load_chat(args.run, args.trust_remote_code, progress=info, download=args.download)
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


def _conversation(chat, settings: GenerationSettings, adapter: bool) -> int:
    from app.core.chat import save_conversation  # here: each command loads its own part of the engine (the window starts without them)
    from app.core.errors import UserError  # here: each command loads its own part of the engine (the window starts without them)

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
    ended = ", stopped" if last.stopped else f", cut at {last.tokens} tokens: --max-new-tokens for more" if last.cut else ""
    print(f"({last.tokens} tokens, {last.tokens_per_s:.1f} tokens/s{ended})", file=sys.stderr)
    return text
