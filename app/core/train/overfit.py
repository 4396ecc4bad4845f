"""Whether training still helps: each eval loss against the best so far and the training loss
since. When the eval loss has stayed above its best for `patience` evals in a row while the
training loss went on falling, the model is learning the training examples rather than the task:
the alarm, once, in one line with the step of the best eval. `--early-stop stop` then ends the
run and makes the best eval's adapter the run's adapter; `warn` (the default) says so and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import mean

EARLY_STOP_CHOICES = ("off", "warn", "stop")
RISE = 0.02  # an eval loss this much above the best (relatively) counts as risen, not noise


@dataclass
class Verdict:
    """What one eval says: a new best, or the alarm (its line), or neither."""

    best: bool = False
    alarm: str = ""


@dataclass
class EvalJudge:
    patience: int = 2
    evals: list[tuple[int, float, float | None]] = field(default_factory=list)  # (step, eval, train mean)
    window: list[float] = field(default_factory=list)  # training losses since the last eval
    alarmed_at: int = 0  # the step of the alarm, once raised

    @classmethod
    def from_history(cls, patience: int, steps: list[int], losses: list[float], eval_steps: list[int],
                     eval_losses: list[float], up_to: int) -> "EvalJudge":
        """The judge as it was at step `up_to` of a run being resumed (its metrics.jsonl)."""
        judge = cls(patience)
        evals = {s: loss for s, loss in zip(eval_steps, eval_losses) if s <= up_to}
        for step, loss in zip(steps, losses):
            if step > up_to:
                break
            judge.add_step(loss)
            if step in evals:
                judge.add_eval(step, evals[step])
        return judge

    @property
    def best(self) -> tuple[int, float] | None:
        """(step, eval loss) of the lowest eval loss so far."""
        if not self.evals:
            return None
        step, loss, _ = min(self.evals, key=lambda e: (e[1], e[0]))
        return step, loss

    def add_step(self, loss: float) -> None:
        self.window.append(loss)

    def add_eval(self, step: int, eval_loss: float) -> Verdict:
        before = self.best
        train = mean(self.window) if self.window else None
        self.window = []
        self.evals.append((step, eval_loss, train))
        if before is None or eval_loss < before[1]:
            return Verdict(best=True)
        if self.alarmed_at:
            return Verdict()
        best_step, best_loss = before
        since = [e for e in self.evals if e[0] > best_step]
        risen = len(since) >= self.patience and all(e[1] > best_loss * (1 + RISE) for e in since[-self.patience:])
        train_at_best = next(e[2] for e in self.evals if e[0] == best_step)
        falling = train is not None and train_at_best is not None and train < train_at_best
        if not (risen and falling):
            return Verdict()
        self.alarmed_at = step
        return Verdict(alarm=(
            f"Overfitting: the eval loss has risen for {len(since)} evals, to {eval_loss:.3f} at step {step}, "
            f"from its best of {best_loss:.3f} at step {best_step}, while the training loss fell from "
            f"{train_at_best:.3f} to {train:.3f}: the model is learning your examples by heart rather than the "
            "task. Fewer steps, a lower learning rate, a smaller rank or more data would help"))
