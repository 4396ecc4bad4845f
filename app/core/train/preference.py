"""Preference tuning: DPO (its sigmoid loss) and ORPO, on the pairs of a preference run.

A pair is one `Tokenized` of both sides (tokenize.py); a micro-batch of pairs goes through one
forward, packed (each side attending only to itself) or padded (each side a row), and each side's
log-probability is the sum over its answer's tokens (`sequence_logps`).

DPO (Rafailov et al. 2023) compares the tuned model with a reference: the model before training,
that is the base with the adapter switched off (no second copy of the weights), or the adapter a
run started from (--from). The reference's per-token log-probabilities of every pair are computed
once, without gradients, before the first step (`ReferenceLogps`), and kept in the run folder: a
resume reads them, and a pair cut shorter later (the out-of-memory back-off) sums the tokens it
kept, since a causal model's earlier tokens do not depend on the later ones.

    loss = -log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))   per pair

ORPO (Hong et al. 2024) needs no reference: the chosen answers' cross-entropy plus beta times an
odds-ratio term of the answers' mean token log-probabilities a, b:

    loss = NLL(chosen answers) - beta * log sigmoid(log(a/(1-a)) - log(b/(1-b)))   (odds of exp(a), exp(b))

The NLL is the mean over the step's chosen answer tokens (TRL's ORPOTrainer takes it over the
prompt too), the odds-ratio term the mean over its pairs. The rewards said in the graphs are TRL's:
beta times the log-ratio to the reference (DPO), beta times the mean log-probability (ORPO).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from app.core.atomic import write_bytes
from app.core.data.packing import Batch
from app.core.data.tokenize import IGNORE, Tokenized
from app.core.train.loss import model_inputs

REFERENCE_FILE = "reference_logps.pt"  # in the run folder: the reference's per-token log-probs of every pair


def answer_logps(model, batch: Batch, device, answers_only: bool = False):
    """(the log-probability of each answer token, the index of its sequence), in order. With
    `answers_only` (a model whose logits are its lm_head's, models/support.py) the lm_head runs on the
    answer tokens' hidden states only: no logits for the prompts' positions."""
    import torch.nn.functional as F

    targets = batch.targets.to(device).reshape(-1)
    keep = targets != IGNORE
    index = batch.sequence_of().to(device)[keep]
    inputs = model_inputs(batch, device)
    if answers_only:
        causal_lm = model.get_base_model()
        hidden = causal_lm.get_decoder()(**inputs).last_hidden_state
        logits = causal_lm.get_output_embeddings()(hidden.reshape(-1, hidden.size(-1))[keep]).float()
    else:
        logits = model(**inputs).logits.float()
        logits = logits.reshape(-1, logits.size(-1))[keep]
    return -F.cross_entropy(logits, targets[keep], reduction="none"), index


def sequence_logps(model, batch: Batch, device, answers_only: bool = False):
    """(summed answer log-probability, answer tokens) of each sequence of `batch`, in its order:
    chosen, rejected, chosen, ... for pairs."""
    import torch

    values, index = answer_logps(model, batch, device, answers_only)
    sums = torch.zeros(batch.sequences, device=device, dtype=values.dtype).index_add(0, index, values)
    counts = torch.zeros(batch.sequences, device=device, dtype=values.dtype).index_add(
        0, index, torch.ones_like(values))
    return sums, counts


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, without cancellation (branching at -ln 2)."""
    import torch

    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta: float):
    """DPO's sigmoid loss of each pair, and the chosen and rejected rewards."""
    import torch.nn.functional as F

    chosen_reward, rejected_reward = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward.detach(), rejected_reward.detach()


def orpo_odds_terms(chosen_mean, rejected_mean, beta: float):
    """ORPO's beta * log sigmoid(log odds ratio) of each pair (to subtract from the NLL), and the rewards."""
    import torch.nn.functional as F

    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return beta * F.logsigmoid(log_odds), beta * chosen_mean.detach(), beta * rejected_mean.detach()


@dataclass
class PreferenceTally:
    """Sums over the pairs seen since the last `take`: what PreferenceMetrics reports."""

    pairs: int = 0
    chosen: float = 0.0
    rejected: float = 0.0
    wins: float = 0.0
    loss: float = 0.0

    def add(self, chosen_reward, rejected_reward) -> None:
        margin = chosen_reward - rejected_reward
        self.pairs += int(margin.numel())
        self.chosen += float(chosen_reward.sum())
        self.rejected += float(rejected_reward.sum())
        self.wins += float((margin > 0).sum()) + 0.5 * float((margin == 0).sum())

    def means(self) -> dict:
        n = max(1, self.pairs)
        return {"chosen_reward": self.chosen / n, "rejected_reward": self.rejected / n,
                "margin": (self.chosen - self.rejected) / n, "accuracy": self.wins / n}


@dataclass
class PreferenceObjective:
    """The loss of a dpo or orpo step, in the session's units: a sum that the step divides by
    `attach`'s divisor (its pairs), as SFT's token loss sum is divided by its tokens."""

    method: str
    beta: float
    reference: "ReferenceLogps | None" = None  # dpo only
    answers_only: bool = False  # the lm_head on the answer tokens only (answer_logps)
    tally: PreferenceTally = field(default_factory=PreferenceTally)
    _chosen_tokens: int = 1  # of the step (ORPO's NLL is their mean)
    _pairs: int = 1

    def attach(self, examples: list[list[Tokenized]], tensors: list[Batch], where: str = "train") -> int:
        """Give each micro-batch its reference log-probs (of the `where` set's pairs); the step's
        divisor (its pairs)."""
        self._pairs = max(1, sum(len(batch) for batch in examples))
        self._chosen_tokens = max(1, sum(pair.side(0).trained_tokens for batch in examples for pair in batch))
        if self.reference is not None:
            for batch, tensor in zip(examples, tensors):
                tensor.reference = self.reference.sums(batch, tensor, where)
        return self._pairs

    def loss(self, model, batch: Batch, device):
        """The summed loss of `batch`'s pairs (ORPO's NLL part scaled so that the step's mean is right)."""
        sums, counts = sequence_logps(model, batch, device, self.answers_only)
        chosen, rejected = sums[0::2], sums[1::2]
        if self.method == "dpo":
            ref = batch.reference.to(device)
            losses, chosen_reward, rejected_reward = dpo_losses(chosen, rejected, ref[:, 0], ref[:, 1], self.beta)
            self.tally.add(chosen_reward, rejected_reward)
            return losses.sum()
        terms, chosen_reward, rejected_reward = orpo_odds_terms(chosen / counts[0::2].clamp(min=1),
                                                                rejected / counts[1::2].clamp(min=1), self.beta)
        self.tally.add(chosen_reward, rejected_reward)
        return -chosen.sum() * (self._pairs / self._chosen_tokens) - terms.sum()

    def take(self) -> dict:
        """The means since the last take, and a fresh tally."""
        return self.take_tally().means()

    def take_tally(self) -> PreferenceTally:
        tally, self.tally = self.tally, PreferenceTally()
        return tally


class ReferenceLogps:
    """The reference model's log-probability of each answer token of every pair, by (set, line)."""

    def __init__(self, values: dict):
        self.values = values  # (set, line) -> (chosen tokens' log-probs, rejected's), 1-d float32 tensors

    def sums(self, pairs: list[Tokenized], batch: Batch, where: str = "train"):
        """(pairs, 2): the reference's summed log-prob of each side's answer tokens as `batch` has them."""
        import torch

        index, targets = batch.sequence_of(), batch.targets.reshape(-1)
        kept = torch.zeros(batch.sequences, dtype=torch.long).index_add(0, index, (targets != IGNORE).long())
        rows = []
        for number, pair in enumerate(pairs):
            sides = self.values[(where, pair.line)]
            rows.append([float(sides[i][:int(kept[2 * number + i])].sum()) for i in (0, 1)])
        return torch.tensor(rows, dtype=torch.float32)

    def save(self, path: Path) -> None:
        import io

        import torch

        buffer = io.BytesIO()
        torch.save({f"{where}:{line}": sides for (where, line), sides in self.values.items()}, buffer)
        write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> "ReferenceLogps | None":
        import torch

        try:
            raw = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError):
            return None
        return cls({(key.split(":")[0], int(key.split(":")[1])): tuple(sides) for key, sides in raw.items()})

    def covers(self, train: list[Tokenized], val: list[Tokenized]) -> bool:
        return all(("train", p.line) in self.values for p in train) and all(("val", p.line) in self.values
                                                                            for p in val)


REFERENCE_PROGRESS_S = 30.0  # compute_reference says how far it is this often


def compute_reference(model, collate, micro_batch: int, sets: dict[str, list[Tokenized]], device,
                      adapter_off: bool, answers_only: bool = False, progress=None) -> ReferenceLogps:
    """The reference's per-token answer log-probs of every pair in `sets` ("train", "val"), without
    gradients: the model with its adapter switched off, or (adapter_off False, --from) as it is.
    `progress(done, total)` hears how many pairs are done about every REFERENCE_PROGRESS_S."""
    import contextlib
    import time

    import torch

    values, total, said = {}, sum(len(pairs) for pairs in sets.values()), time.monotonic()
    was_training = model.training
    model.eval()
    switch = model.disable_adapter() if adapter_off else contextlib.nullcontext()
    with torch.no_grad(), switch:
        for where, pairs in sets.items():
            for start in range(0, len(pairs), micro_batch):
                chunk = pairs[start:start + micro_batch]
                logps, index = answer_logps(model, collate(chunk), device, answers_only)
                logps, index = logps.float().cpu(), index.cpu()
                for number, pair in enumerate(chunk):
                    values[(where, pair.line)] = tuple(logps[index == 2 * number + i].clone() for i in (0, 1))
                if progress is not None and time.monotonic() - said >= REFERENCE_PROGRESS_S:
                    progress(len(values), total)
                    said = time.monotonic()
    if was_training:
        model.train()
    return ReferenceLogps(values)
