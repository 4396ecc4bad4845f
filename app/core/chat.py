"""Talk to a trained adapter: load the base model (4-bit) and the adapter once, then answer with
or without the adapter, streamed token by token.

An adapter comes from a run (its final adapter, or its latest checkpoint while it is unfinished),
a checkpoint folder, or any PEFT adapter folder. Switching the adapter off needs no reload, so
the base model's answer to the same prompt is one call away. Generation can be stopped between
tokens, and every answer reports its tokens per second.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from app.core import host
from app.core.adapters import AdapterSource, adapter_tokenizer, find_adapter, trained_storage
from app.core.atomic import append_line
from app.core.errors import RunError
from app.core.models.load import load_base_model
from app.core.models.resolve import resolve_model


@dataclass
class GenerationSettings:
    """How an answer is generated; the GUI and `tunesmith chat` show these docs as help."""

    system_prompt: str = field(default="", metadata={"help": "Instructions put before the conversation "
                                                            "(a system turn); empty for none."})
    temperature: float = field(default=0.7, metadata={"help": "Randomness of the answer; 0 always picks the "
                                                             "likeliest token (greedy)."})
    top_p: float = field(default=0.9, metadata={"help": "Sample only from the likeliest tokens whose "
                                                       "probabilities add up to this."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest answer, in tokens."})
    repetition_penalty: float = field(default=1.1, metadata={"help": "Above 1 discourages repeating the "
                                                                    "same words."})
    stop: list[str] = field(default_factory=list, metadata={"help": "Strings that end the answer "
                                                                   "(besides the model's end token)."})


@dataclass
class AnswerStats:
    tokens: int = 0
    seconds: float = 0.0
    stopped: bool = False  # stopped by the user before the model finished
    cut: bool = False  # ended by the token limit (max_new_tokens), not by the model: mid-answer

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class ChatSession:
    """A base model with an adapter, loaded once; `stream` and `reply` answer a conversation."""

    def __init__(self, model, tokenizer, device: str, source: AdapterSource):
        self.model, self.tokenizer, self.device, self.source = model, tokenizer, device, source
        self.last = AnswerStats()

    def prompt_ids(self, messages: list[dict], settings: GenerationSettings):
        turns = list(messages)
        if settings.system_prompt and not (turns and turns[0].get("role") == "system"):
            turns.insert(0, {"role": "system", "content": settings.system_prompt})
        prompt = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.device)

    def stream(self, messages: list[dict], settings: GenerationSettings | None = None, adapter: bool = True,
               stop: threading.Event | None = None) -> Iterator[str]:
        """Yield the assistant's next turn piece by piece; `stop` ends it after the current token."""
        from transformers import TextIteratorStreamer

        settings = settings or GenerationSettings()
        stop = stop or threading.Event()
        inputs = self.prompt_ids(messages, settings)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        outcome: dict = {}

        def generate() -> None:
            try:
                outcome["output"] = self._generate(inputs, settings, adapter, stop, streamer)
            except BaseException as err:  # noqa: BLE001 - raised again on the caller's thread
                outcome["error"] = err
                streamer.end()

        started = time.monotonic()
        worker = threading.Thread(target=generate, name="tunesmith-generate", daemon=True)
        worker.start()
        text, cut_short = "", False
        try:
            for piece in streamer:
                text += piece
                cut = _stop_at(text, settings.stop)
                if cut is not None:  # a stop string: yield up to it, then let the generator finish
                    cut_short = True
                    stop.set()
                    if cut > len(text) - len(piece):
                        yield piece[:cut - (len(text) - len(piece))]
                    break
                if piece:
                    yield piece
        except GeneratorExit:  # the caller stopped reading: end generation too
            cut_short = True
            stop.set()
            raise
        finally:
            if cut_short:
                for _ in streamer:  # the rest up to the end signal, so the thread can finish
                    pass
            worker.join()
        if "error" in outcome:
            raise outcome["error"]
        self._record(inputs, outcome.get("output"), started, stop.is_set() and not cut_short,
                     0 if cut_short else settings.max_new_tokens)

    def reply(self, messages: list[dict], settings: GenerationSettings | None = None, adapter: bool = True) -> str:
        """The whole next turn at once (greedy when the temperature is 0)."""
        settings = settings or GenerationSettings()
        inputs = self.prompt_ids(messages, settings)
        started = time.monotonic()
        output = self._generate(inputs, settings, adapter, threading.Event(), None)
        self._record(inputs, output, started, False, settings.max_new_tokens)
        text = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        cut = _stop_at(text, settings.stop)
        return text if cut is None else text[:cut]

    def _generate(self, inputs, settings: GenerationSettings, adapter: bool, stop: threading.Event, streamer):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class StopRequested(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        sampling = ({"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
                    if settings.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None})
        options = dict(max_new_tokens=settings.max_new_tokens, repetition_penalty=settings.repetition_penalty,
                       pad_token_id=self.tokenizer.pad_token_id, streamer=streamer, top_k=None,
                       stopping_criteria=StoppingCriteriaList([StopRequested()]), **sampling)
        with torch.no_grad():
            if adapter:
                return self.model.generate(**inputs, **options)
            with self.model.disable_adapter():
                return self.model.generate(**inputs, **options)

    def _record(self, inputs, output, started: float, stopped: bool, limit: int = 0) -> None:
        """The answer's stats; `limit` the token limit it ran under (0: ended by a stop string)."""
        tokens = 0 if output is None else int(output.shape[1] - inputs["input_ids"].shape[1])
        ended = output is not None and tokens and int(output[0, -1]) in end_ids(self.tokenizer, self.model)
        self.last = AnswerStats(tokens, time.monotonic() - started, stopped,
                                cut=bool(limit and not stopped and tokens >= limit and not ended))


def load_chat(ref: str, trust_remote_code: bool = False,
              progress: Callable[[str], None] = lambda message: None, download: bool = False) -> ChatSession:
    """Load the base model as the adapter was trained on it (in 4-bit, or unquantised for a run
    trained on a 16-bit base) and the adapter `ref` names (see `find_adapter`); a base that is not
    on this machine is downloaded only with `download`."""
    import torch
    from peft import PeftModel

    source = find_adapter(ref)
    device, dtype = host.compute_device()
    quantize = trained_storage(source)[0]
    info = resolve_model(source.base, trust_remote_code, progress=progress, download=download)
    how = "in 4-bit" if quantize == "4bit" else f"unquantised ({dtype})"
    progress(f"Loading {info.name} {how} on {device} with the adapter {source.label}")
    base = load_base_model(info, getattr(torch, dtype), device, trust_remote_code, quantize=quantize)
    model = PeftModel.from_pretrained(base, source.adapter_dir)
    model.eval()
    return ChatSession(model, adapter_tokenizer(source, info, trust_remote_code), device, source)


def save_conversation(path: str | Path, messages: list[dict], system_prompt: str = "") -> Path:
    """Append the conversation to `path` as one line of Tunesmith's `messages` format, so a good
    answer can go back into a training set."""
    turns = [{"role": m["role"], "content": m["content"]} for m in messages if m.get("content")]
    if system_prompt and not (turns and turns[0]["role"] == "system"):
        turns.insert(0, {"role": "system", "content": system_prompt})
    if not any(t["role"] == "assistant" for t in turns):
        raise RunError("the conversation has no answer yet; nothing to save")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    append_line(path, json.dumps({"messages": turns}, ensure_ascii=False))
    return path


def end_ids(tokenizer, model) -> set[int]:
    """The token ids that end an answer (the tokenizer's and the generation config's EOS)."""
    ids = {tokenizer.eos_token_id}
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {i for i in ids if i is not None}


def _stop_at(text: str, stops: list[str]) -> int | None:
    """Where the first stop string starts in `text`, or None."""
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None
