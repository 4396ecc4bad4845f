"""The Ollama Modelfile beside a GGUF file: a TEMPLATE that renders prompts exactly as the model's
chat template does, and the stop tokens that end a turn."""

from __future__ import annotations

import json

from app.core.errors import ExportError


def ollama_modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile whose TEMPLATE renders prompts as the model's chat template does.

    The template is found by rendering the chat template with marker strings and putting Ollama's
    `{{ .System }}`, `{{ .Prompt }}` and `{{ .Response }}` where the markers land, so it works for
    any template (ChatML, Llama 3, Mistral, ...) without a table of known formats."""
    system, user, answer = "\x01SYSTEM\x01", "\x01PROMPT\x01", "\x01RESPONSE\x01"

    def render(messages: list[dict], generation: bool) -> str | None:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception:  # noqa: BLE001 - e.g. a template that refuses a system turn
            return None

    with_system = render([{"role": "system", "content": system}, {"role": "user", "content": user}], True)
    without = render([{"role": "user", "content": user}], True)
    whole = render([{"role": "user", "content": user}, {"role": "assistant", "content": answer}], False)
    if without is None or whole is None or user not in without or answer not in whole:
        raise ExportError("the model's chat template cannot be turned into an Ollama TEMPLATE; "
                          "write the Modelfile's TEMPLATE by hand")
    ending = whole.split(answer, 1)[1]  # what closes the assistant's turn, e.g. "<|im_end|>\n"
    if with_system is not None and system in with_system:
        split = _shared_tail(with_system, without, tokenizer)
        shared = len(with_system) - split  # the user's turn onwards, the same with or without a system turn
        head = with_system[:split].replace(system, "{{ .System }}")
        template = (f"{{{{ if .System }}}}{head}{{{{ else }}}}{without[:len(without) - shared]}{{{{ end }}}}"
                    + with_system[split:].replace(user, "{{ .Prompt }}"))
    else:
        template = without.replace(user, "{{ .Prompt }}")
    template += "{{ .Response }}" + ending
    stops = _stop_tokens(tokenizer, ending, without.split(user, 1)[0])
    if '"""' in template:
        raise ExportError('the chat template contains """, which a Modelfile cannot quote')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def _shared_tail(with_system: str, without: str, tokenizer) -> int:
    """Where, in `with_system`, the text it shares with `without` up to the end starts (the user's
    turn onwards), moved forward to a token boundary so no special token is cut in two."""
    n = 0
    while n < min(len(with_system), len(without)) and with_system[-1 - n] == without[-1 - n]:
        n += 1
    split = len(with_system) - n
    for token in sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})),
                        key=len, reverse=True):
        start = with_system.rfind(token, 0, split)
        if start != -1 and start < split < start + len(token):
            return start + len(token)
    return split


def _stop_tokens(tokenizer, ending: str, user_prefix: str) -> list[str]:
    """The end token, the token that closes a turn and the one that opens the user's turn."""
    special = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})),
                     key=len, reverse=True)
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    for text in (ending, user_prefix):
        found = [(text.rfind(t) if text is user_prefix else text.find(t), t) for t in special if t and t in text]
        if found:
            stops.append(min(found)[1] if text is ending else max(found)[1])
    return list(dict.fromkeys(stops))
