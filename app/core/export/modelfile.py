"""The Ollama Modelfile beside a GGUF file: a TEMPLATE that renders whole conversations (a system
turn, any number of user and assistant turns, the generation prompt) exactly as the model's chat
template does, a stop for every token that ends a turn, and the sampling defaults of the model's
generation_config.json.

The template is found by rendering the chat template with marker strings and cutting the text
around them into the pieces each turn is made of (what opens and closes a user turn, an assistant
turn, the system turn, the start of the prompt with and without a system turn). The pieces are
checked by rendering a four-turn conversation both ways, so any template (ChatML, Llama 3, Mistral,
one that adds a default system prompt) works without a table of known formats, or is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from app.core.errors import ExportError

SYSTEM, USER, ANSWER, USER2, ANSWER2 = ("\x01SYSTEM\x01", "\x01PROMPT\x01", "\x01RESPONSE\x01", "\x01PROMPT2\x01",
                                        "\x01RESPONSE2\x01")
# generation_config.json key -> Ollama PARAMETER
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "repetition_penalty": "repeat_penalty"}
NOT_TEMPLATABLE = ("the model's chat template cannot be turned into an Ollama TEMPLATE; write the Modelfile's "
                   "TEMPLATE by hand")


@dataclass(frozen=True)
class TurnPieces:
    """The text around each turn's content, as the chat template writes it."""

    head: str  # the prompt's start without a system turn (a default system prompt lives here)
    system_head: str | None  # ... before the system text, when the template takes a system turn
    system_tail: str  # ... after it
    user_open: str
    user_close: str
    assistant_open: str  # in the history
    assistant_close: str
    generation: str  # what asks for the answer after the last user turn

    def go_template(self) -> str:
        """Ollama's TEMPLATE (Go text/template) over .System and .Messages, on one line so that no
        whitespace trimming touches the pieces."""
        system = "" if self.system_head is None else f"{self.system_head}{{{{ .System }}}}{self.system_tail}"
        head = f"{{{{ if .System }}}}{system}{{{{ else }}}}{self.head}{{{{ end }}}}" if system else self.head
        return (head + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
                f'{{{{ if eq .Role "user" }}}}{self.user_open}{{{{ .Content }}}}{self.user_close}'
                f"{{{{ if $last }}}}{self.generation}{{{{ end }}}}"
                f'{{{{ else if eq .Role "assistant" }}}}{self.assistant_open}{{{{ .Content }}}}'
                f"{{{{ if not $last }}}}{self.assistant_close}{{{{ end }}}}{{{{ end }}}}{{{{ end }}}}")

    def render(self, system: str, turns: list[dict], generation: bool = True) -> str:
        """What the TEMPLATE renders for `turns` (for the check against the chat template)."""
        text = (self.system_head + system + self.system_tail) if system and self.system_head is not None else self.head
        for index, turn in enumerate(turns):
            last = index == len(turns) - 1
            if turn["role"] == "user":
                text += self.user_open + turn["content"] + self.user_close + (self.generation if last and generation
                                                                              else "")
            else:
                text += self.assistant_open + turn["content"] + ("" if last else self.assistant_close)
        return text


def ollama_modelfile(gguf_name: str, tokenizer, generation_config: dict | None = None) -> str:
    """An Ollama Modelfile whose TEMPLATE renders conversations as the model's chat template does."""
    pieces = turn_pieces(tokenizer)
    template = pieces.go_template()
    if '"""' in template:
        raise ExportError('the chat template contains """, which a Modelfile cannot quote')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stop_tokens(tokenizer, pieces, generation_config)]
    lines += [f"PARAMETER {name} {value:g}" for name, value in sampling_defaults(generation_config or {}).items()]
    return "\n".join(lines) + "\n"


def turn_pieces(tokenizer) -> TurnPieces:
    """Cut the chat template's renderings at the markers into TurnPieces; an ExportError when the
    pieces do not give back the template's own rendering of a multi-turn conversation."""
    def render(messages: list[dict], generation: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception:  # noqa: BLE001 - e.g. a template that refuses a system turn
            return ""

    user, answer = {"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}
    one, asked = render([user]), render([user], True)
    two = render([user, answer])
    three = render([user, answer, {"role": "user", "content": USER2}])
    if not (USER in one and asked.startswith(one) and two.startswith(one) and ANSWER in two
            and three.startswith(two) and USER2 in three):
        raise ExportError(NOT_TEMPLATABLE)
    user_close = one.split(USER, 1)[1]
    assistant_open, assistant_close = two[len(one):].split(ANSWER, 1)
    user_open = three[len(two):].split(USER2, 1)[0]
    before = one.split(USER, 1)[0]
    if not before.endswith(user_open):
        raise ExportError(NOT_TEMPLATABLE)
    head = before[:len(before) - len(user_open)]
    system_head, system_tail = None, ""
    with_system = render([{"role": "system", "content": SYSTEM}, user])
    if SYSTEM in with_system and with_system.split(SYSTEM, 1)[1].endswith(user_open + USER + user_close):
        system_head, rest = with_system.split(SYSTEM, 1)
        system_tail = rest[:len(rest) - len(user_open + USER + user_close)]
    pieces = TurnPieces(head, system_head, system_tail, user_open, user_close, assistant_open, assistant_close,
                        asked[len(one):])
    _check(pieces, render)
    return pieces


def _check(pieces: TurnPieces, render) -> None:
    turns = [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER},
             {"role": "user", "content": USER2}, {"role": "assistant", "content": ANSWER2},
             {"role": "user", "content": USER}]
    systems = [""] + ([SYSTEM] if pieces.system_head is not None else [])
    for system in systems:
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        if pieces.render(system, turns) != render(messages, True):
            raise ExportError(NOT_TEMPLATABLE + " (its turns do not repeat the same way)")


def stop_tokens(tokenizer, pieces: TurnPieces, generation_config: dict | None = None) -> list[str]:
    """Every token that ends the model's turn: the end token, the generation config's end tokens
    (Llama 3 lists <|eot_id|> and <|eom_id|> beside <|end_of_text|>), the special token that closes
    an assistant turn and the one that opens a user turn (should the model write one)."""
    special = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})),
                     key=len, reverse=True)
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    ids = (generation_config or {}).get("eos_token_id")
    for token_id in ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else []:
        text = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(text, str) and text:
            stops.append(text)
    for text, last in ((pieces.assistant_close, False), (pieces.user_open, True)):
        found = [(text.rfind(t) if last else text.find(t), t) for t in special if t and t in text]
        if found:
            stops.append(max(found)[1] if last else min(found)[1])
    return list(dict.fromkeys(stops))


def sampling_defaults(generation_config: dict) -> dict[str, float]:
    """Ollama PARAMETERs from the sampling values generation_config.json gives."""
    return {name: float(generation_config[key]) for key, name in SAMPLING.items()
            if isinstance(generation_config.get(key), (int, float)) and not isinstance(generation_config[key], bool)}
