"""What the report asks of a model, with its adapter on (tuned) or off (base), in batches and
without gradients: greedy answers to prompts, each held-out example's loss, and the
log-likelihood of each choice of a multiple-choice question.

The model is a PEFT model as `chat.load_chat` loads it (the base as it was trained on, the adapter
on top); switching the adapter off needs no second copy of the weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

from app.core.chat import end_ids

GENERATE_BATCH = 64  # the probes in one batch: on a CPU a step of 50 rows costs 3x one row's
MIN_SHARED = 8  # shorter common starts are not worth a cache of their own
SCORE_BATCH = 8


class Cancelled(Exception):
    """The user stopped the report (Stop now); the parts done so far are kept."""


@dataclass
class Answer:
    text: str
    tokens: int
    ended: bool  # the model ended it (its end token), not the token limit


def greedy_answers(session, prompts: list, max_new_tokens: int, adapter: bool, repetition_penalty: float = 1.0,
                   cancelled: Callable[[], bool] = lambda: False) -> list[Answer]:
    """Each prompt's greedy answer: a prompt is a list of chat messages (rendered with the chat
    template and a generation prompt) or a plain string (a prompt/completion example's prompt)."""
    import torch

    tokenizer, model = session.tokenizer, session.model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ends = end_ids(tokenizer, model)
    answers: list[Answer] = []
    for start in range(0, len(prompts), GENERATE_BATCH):
        if cancelled():
            raise Cancelled
        rows = [_prompt_ids(tokenizer, prompt) for prompt in prompts[start:start + GENERATE_BATCH]]
        with torch.inference_mode(), _adapter(model, adapter):
            out, width = _generate(model, rows, pad, session.device, max_new_tokens=max_new_tokens, do_sample=False,
                                   temperature=None, top_p=None, top_k=None, repetition_penalty=repetition_penalty,
                                   pad_token_id=pad)
        for row in out[:, width:].tolist():
            cut = next((i for i, token in enumerate(row) if token in ends), None)
            kept = row if cut is None else row[:cut]
            answers.append(Answer(tokenizer.decode(kept, skip_special_tokens=True).strip(), len(kept), cut is not None))
    return answers


def _generate(model, rows: list[list[int]], pad: int, device, **options):
    """Generate for `rows` of prompt ids; (the output ids, the prompt width they start after).

    The prompts' common start (a chat template's system prompt and turn marker: half of a short
    probe) is computed once and shared: its keys and values repeated for every row, the rows padded
    after it instead of before, so each row's positions run on unbroken and the answers are the
    same as padding on the left gives (tested), in about two thirds of the time for the probes."""
    import torch

    width = max(len(row) for row in rows)
    shared = _common_start(rows)
    if shared >= MIN_SHARED and len(rows) > 1:
        try:
            cache = model(input_ids=torch.tensor([rows[0][:shared]], device=device), use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(rows))
            ids = [row[:shared] + [pad] * (width - len(row)) + row[shared:] for row in rows]
            mask = [[1] * shared + [0] * (width - len(row)) + [1] * (len(row) - shared) for row in rows]
            return model.generate(input_ids=torch.tensor(ids, device=device), past_key_values=cache,
                                  attention_mask=torch.tensor(mask, device=device), **options), width
        except (AttributeError, TypeError, ValueError):  # a cache or model that cannot share: pad on the left
            pass
    ids = [[pad] * (width - len(row)) + row for row in rows]
    mask = [[0] * (width - len(row)) + [1] * len(row) for row in rows]
    return model.generate(input_ids=torch.tensor(ids, device=device),
                          attention_mask=torch.tensor(mask, device=device), **options), width


def _common_start(rows: list[list[int]]) -> int:
    """How many first tokens all rows share, leaving each at least one of its own."""
    limit = min(len(row) for row in rows) - 1
    count = 0
    while count < limit and all(row[count] == rows[0][count] for row in rows):
        count += 1
    return count


def example_losses(session, examples: list, adapter: bool, cancelled: Callable[[], bool] = lambda: False) -> list[float]:
    """Each tokenised example's mean loss over its learned tokens (its labels), as training counts it."""
    import torch

    losses = []
    for example in examples:
        if cancelled():
            raise Cancelled
        ids = torch.tensor([example.input_ids], device=session.device)
        target = torch.tensor(example.labels[1:], device=session.device)
        keep = torch.nonzero(target != -100).flatten()
        if not len(keep):
            losses.append(float("nan"))
            continue
        logits = _logits_at(session.model, ids, keep, adapter)
        losses.append(float(torch.nn.functional.cross_entropy(logits.float(), target[keep])))
    return losses


def choice_logliks(session, question: list[dict], choices: list[str], adapter: bool) -> list[float]:
    """The summed log-probability of each choice's tokens as the answer to `question` (chat
    messages), as multiple-choice harnesses score a choice."""
    import torch

    tokenizer = session.tokenizer
    context = _prompt_ids(tokenizer, question)
    scores = []
    for choice in choices:
        tail = tokenizer(choice, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        ids = torch.tensor([context + tail], device=session.device)
        where = torch.arange(len(context) - 1, len(context) + len(tail) - 1, device=session.device)
        logits = _logits_at(session.model, ids, where, adapter).float()
        picked = torch.log_softmax(logits, -1).gather(1, torch.tensor(tail, device=session.device)[:, None])
        scores.append(float(picked.sum()))
    return scores


def _logits_at(model, ids, positions, adapter: bool):
    """The logits at `positions` of `ids` (each predicting the next token), without the whole
    sequence's vocabulary-wide logits where the model can keep only some."""
    import torch

    with torch.inference_mode(), _adapter(model, adapter):
        try:
            return model(input_ids=ids, logits_to_keep=positions).logits[0]
        except TypeError:  # a model without logits_to_keep
            return model(input_ids=ids).logits[0, positions]


def _adapter(model, on: bool):
    return contextlib.nullcontext() if on else model.disable_adapter()


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
