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
from app.core.atomic import append_line
from app.core.errors import ModelError, RunError


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


@dataclass
class AdapterSource:
    """Where an adapter and its base model are."""

    adapter_dir: Path
    base: str  # a model reference `resolve_model` understands: "demo", a folder or a hub id
    label: str
    tokenizer_dir: Path | None = None  # a tokenizer saved with the adapter (its chat template)
    run_dir: Path | None = None  # the run the adapter belongs to, if any


def find_adapter(ref: str) -> AdapterSource:
    """The adapter `ref` names: a run (id, prefix or folder), a run's checkpoint, or a PEFT adapter folder."""
    from app.core.runs import open_run

    path = Path(ref).expanduser()
    if (path / "adapter_config.json").exists():
        run_dir = _run_of(path)
        if run_dir is not None:
            run = open_run(str(run_dir))
            tokenizer = run.adapter_dir if (run.adapter_dir / "tokenizer_config.json").exists() else None
            return AdapterSource(path, run.config().model, f"{run.id} ({path.name})", tokenizer or path, run.dir)
        return AdapterSource(path, _base_of(path), path.name, path)
    run = open_run(ref)
    if (run.adapter_dir / "adapter_config.json").exists():
        return AdapterSource(run.adapter_dir, run.config().model, run.id, run.adapter_dir, run.dir)
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        raise RunError(f"run {run.id} has no adapter yet and no checkpoint; train it for a few steps first")
    return AdapterSource(checkpoint, run.config().model, f"{run.id} ({checkpoint.name})", run_dir=run.dir)


def base_to_download(ref: str) -> str:
    """The hub id of the base model `ref`'s adapter names when no copy of it is on this machine
    (loading or exporting would download it: the window asks first), else ""."""
    from app.core.models.resolve import is_missing_hub_model

    try:
        base = find_adapter(ref).base
    except Exception:  # noqa: BLE001 - the load or export itself reports a bad reference
        return ""
    return base if is_missing_hub_model(base) else ""


def runs_with_adapter() -> list:
    """The runs `find_adapter` can use (a final adapter or a checkpoint), newest first, as RunSummary rows."""
    from app.core.runs import list_runs, open_run

    rows = []
    for row in list_runs():
        run = open_run(row.id)
        if (run.adapter_dir / "adapter_config.json").exists() or run.latest_checkpoint() is not None:
            rows.append(row)
    return rows


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

    from app.core.models.load import load_base_model
    from app.core.models.resolve import resolve_model

    source = find_adapter(ref)
    device, dtype = host.compute_device()
    quantize = _trained_quantize(source)
    info = resolve_model(source.base, trust_remote_code, progress=progress, download=download)
    how = "in 4-bit" if quantize == "4bit" else f"unquantised ({dtype})"
    progress(f"Loading {info.name} {how} on {device} with the adapter {source.label}")
    base = load_base_model(info, getattr(torch, dtype), device, trust_remote_code, quantize=quantize)
    model = PeftModel.from_pretrained(base, source.adapter_dir)
    model.eval()
    return ChatSession(model, adapter_tokenizer(source, info, trust_remote_code), device, source)


def _trained_quantize(source: AdapterSource) -> str:
    return trained_storage(source)[0]


def trained_storage(source: AdapterSource) -> tuple[str, str]:
    """(how the base was stored, the compute dtype) when the adapter was trained, as the run's plan
    says: ("4bit", "bfloat16") for runs from before the plan recorded it and for adapters from
    elsewhere (QLoRA's defaults)."""
    if source.run_dir is None:
        return "4bit", "bfloat16"
    from app.core.runs import open_run

    try:
        plan = open_run(str(source.run_dir)).plan()
    except Exception:  # noqa: BLE001 - an unreadable plan: the QLoRA default
        return "4bit", "bfloat16"
    return plan.quantize or "4bit", plan.compute_dtype or "bfloat16"


def adapter_tokenizer(source: AdapterSource, info, trust_remote_code: bool = False):
    """The tokenizer trained with (saved beside the adapter), else the base model's; with a chat template."""
    from app.core.data.tokenize import ensure_chat_template
    from app.core.models.load import load_tokenizer

    if source.tokenizer_dir is not None and (source.tokenizer_dir / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        from app.core.models.load import refuse_own_code

        refuse_own_code(source.tokenizer_dir, "tokenizer_config.json", "the adapter's tokenizer", trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir, trust_remote_code=trust_remote_code)
        except Exception as err:  # noqa: BLE001 - a damaged tokenizer folder is the user's to fix
            raise ModelError(f"{source.tokenizer_dir}: cannot load the adapter's tokenizer "
                             f"({str(err).splitlines()[0][:160] if str(err) else type(err).__name__})") from None
        from app.core.models.template_guard import check_template

        check_template(getattr(tokenizer, "chat_template", None), str(source.tokenizer_dir))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = load_tokenizer(info, trust_remote_code)
    ensure_chat_template(tokenizer)
    return tokenizer


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


def _run_of(path: Path) -> Path | None:
    """The run folder an adapter or checkpoint folder belongs to, if any."""
    for parent in (path.parent, path.parent.parent):
        if (parent / "status.json").exists() and (parent / "config.json").exists():
            return parent
    return None


def _base_of(adapter_dir: Path) -> str:
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RunError(f"{adapter_dir / 'adapter_config.json'}: cannot read ({err})") from None
    base = config.get("base_model_name_or_path")
    if not base:
        raise RunError(f"{adapter_dir / 'adapter_config.json'}: no base_model_name_or_path; cannot tell which "
                       "model the adapter belongs to")
    return base
