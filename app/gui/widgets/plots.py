"""The graphs: training loss (raw, smoothed, eval points), learning rate, several runs' loss
compared, and the colours and set-up they share (live_graphs.py stacks them with memory;
preference_plots.py draws a preference run's margin and accuracy with the same two classes).

Each graph keeps its points in Python lists, appended as events arrive, and redraws on a timer
(`refresh`, ~5 times a second) with one `setData` per curve; downsampling and clip-to-view keep
10k+ points smooth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt

SMOOTHING = 0.9  # exponential moving average weight of the smoothed loss
REDRAW_MS = 200
# The memory graph's colours, each readable on the light and the dark background.


def graph_colors(dark: bool) -> tuple[str, str]:
    """Background and foreground (axes, text) of the graphs."""
    return ("#1e1e1e", "#dddddd") if dark else ("#ffffff", "#333333")


def use_palette(dark: bool) -> None:
    """Graphs made from now on follow the window's light or dark palette."""
    background, foreground = graph_colors(dark)
    pg.setConfigOptions(background=background, foreground=foreground, antialias=True)


def set_up(plot: pg.PlotWidget, title: str, bottom: str, min_height: int) -> None:
    """What every graph here shares: title, x label, a faint grid, no context menu."""
    plot.setTitle(title)
    plot.setLabel("bottom", bottom)
    plot.showGrid(x=True, y=True, alpha=0.2)
    plot.setMenuEnabled(False)
    plot.setMinimumHeight(min_height)


def curve(plot: pg.PlotWidget, color, width: float = 1.5, style=Qt.SolidLine, name: str = ""):
    item = plot.plot(pen=pg.mkPen(color, width=width, style=style), name=name or None)
    item.setDownsampling(auto=True, method="peak")
    item.setClipToView(True)
    return item


class LossPlot(pg.PlotWidget):
    """Training loss per step (faint), its moving average (bold) and eval loss (dots); with other
    words, any measure a run logs per step and at each eval (a preference run's reward margin)."""

    def __init__(self, title: str = "Loss", name: str = "loss", eval_name: str = "eval loss",
                 min_height: int = 180):
        super().__init__()
        set_up(self, title, "step", min_height)
        self.addLegend(offset=(-10, 10))
        self.raw = curve(self, (120, 160, 220, 110), 1, name=name)
        self.smooth = curve(self, (40, 110, 220), 2.2, name="smoothed")
        self.eval = self.plot(pen=None, symbol="o", symbolSize=7, symbolBrush=(230, 120, 30), name=eval_name)
        self.clear_points()

    def clear_points(self) -> None:
        self.steps, self.losses, self.smoothed = [], [], []
        self.eval_steps, self.eval_losses = [], []
        self._dirty = True
        self.refresh()

    def add_step(self, step: int, loss: float) -> None:
        previous = self.smoothed[-1] if self.smoothed else loss
        self.steps.append(step)
        self.losses.append(loss)
        self.smoothed.append(SMOOTHING * previous + (1 - SMOOTHING) * loss)
        self._dirty = True

    def add_eval(self, step: int, loss: float) -> None:
        self.eval_steps.append(step)
        self.eval_losses.append(loss)
        self._dirty = True

    def rewind(self, step: int) -> None:
        """Forget points after `step` (a resumed run continues from its checkpoint)."""
        keep = sum(1 for s in self.steps if s <= step)
        del self.steps[keep:], self.losses[keep:], self.smoothed[keep:]
        keep = sum(1 for s in self.eval_steps if s <= step)
        del self.eval_steps[keep:], self.eval_losses[keep:]
        self._dirty = True

    def refresh(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        steps = np.asarray(self.steps, dtype=float)
        self.raw.setData(steps, np.asarray(self.losses, dtype=float))
        self.smooth.setData(steps, np.asarray(self.smoothed, dtype=float))
        self.eval.setData(np.asarray(self.eval_steps, dtype=float), np.asarray(self.eval_losses, dtype=float))

    def show_history(self, history) -> None:
        """Draw a past run (a `RunHistory`) in place of the current points."""
        self.show_points(history.steps, history.losses, history.eval_steps, history.eval_losses)

    def show_points(self, steps, values, eval_steps, eval_values) -> None:
        """Draw these points (a past run's) in place of the current ones."""
        self.clear_points()
        for step, value in zip(steps, values):
            self.add_step(step, value)
        for step, value in zip(eval_steps, eval_values):
            self.add_eval(step, value)
        self.refresh()

    @property
    def point_count(self) -> int:
        return len(self.steps)


class LearningRatePlot(pg.PlotWidget):
    """The learning rate per step: warmup, then the cosine decay."""

    def __init__(self):
        super().__init__()
        set_up(self, "Learning rate", "step", 120)
        self.curve = curve(self, (90, 170, 90), 1.8)
        self.clear_points()

    def clear_points(self) -> None:
        self.steps, self.rates, self._dirty = [], [], True
        self.refresh()

    def add_step(self, step: int, lr: float) -> None:
        self.steps.append(step)
        self.rates.append(lr)
        self._dirty = True

    def rewind(self, step: int) -> None:
        keep = sum(1 for s in self.steps if s <= step)
        del self.steps[keep:], self.rates[keep:]
        self._dirty = True

    def refresh(self) -> None:
        if self._dirty:
            self._dirty = False
            self.curve.setData(np.asarray(self.steps, dtype=float), np.asarray(self.rates, dtype=float))

    def show_history(self, history) -> None:
        self.steps, self.rates, self._dirty = list(history.steps), list(history.lrs), True
        self.refresh()


@dataclass
class Curve:
    """One run's measure in a `ComparePlot`: per step, at each eval, and the real tokens trained up
    to each step (for the "by tokens" axis)."""

    name: str
    color: int  # the run's place among those compared: the same colour in every graph
    steps: list[int]
    values: list[float]
    eval_steps: list[int] = field(default_factory=list)
    eval_values: list[float] = field(default_factory=list)
    tokens: dict[int, int] = field(default_factory=dict)  # step -> tokens trained through it


class ComparePlot(pg.PlotWidget):
    """The smoothed loss (or another measure) of several runs over one another, one colour each,
    eval points as dots."""

    COLORS = ((40, 110, 220), (230, 120, 30), (46, 158, 91), (200, 60, 160), (150, 110, 60),
              (0, 160, 170), (180, 50, 50), (120, 120, 120))

    def __init__(self, title: str = "Loss (smoothed), compared", min_height: int = 180):
        super().__init__()
        set_up(self, title, "step", min_height)
        self.legend = self.addLegend(offset=(-10, 10))
        self.names: list[str] = []

    def show_runs(self, runs, by: str = "step") -> None:
        """`runs`: (name, RunHistory) pairs; `by` "step" or "tokens" (real tokens trained so far:
        fair between runs whose steps hold 192 tokens and 4,096)."""
        self.draw([Curve(name, i, history.steps, history.losses, history.eval_steps, history.eval_losses,
                         dict(zip(history.steps, history.tokens_through))) for i, (name, history) in enumerate(runs)],
                  by)

    def draw(self, curves: list[Curve], by: str = "step") -> None:
        """Each curve smoothed, its eval points as dots, over steps or tokens trained."""
        self.clear()
        self.legend.clear()
        self.names = []
        self.by = by
        self.setLabel("bottom", "tokens trained" if by == "tokens" else "step")
        for line in curves:
            color = self.COLORS[line.color % len(self.COLORS)]
            points = [(line.tokens[s] if by == "tokens" else s, v) for s, v in zip(line.steps, line.values)
                      if by != "tokens" or s in line.tokens]
            curve(self, color, 2, name=line.name).setData(np.asarray([x for x, _ in points], dtype=float),
                                                          np.asarray(smoothed([y for _, y in points]), dtype=float))
            evals = [(line.tokens[s] if by == "tokens" else s, v) for s, v in zip(line.eval_steps, line.eval_values)
                     if by != "tokens" or s in line.tokens]
            if evals:
                self.plot(np.asarray([x for x, _ in evals], dtype=float), np.asarray([y for _, y in evals], dtype=float),
                          pen=None, symbol="o", symbolSize=6, symbolBrush=color)
            self.names.append(line.name)


def smoothed(values) -> list[float]:
    """The exponential moving average the loss graph draws in bold."""
    out: list[float] = []
    for value in values:
        out.append(SMOOTHING * (out[-1] if out else value) + (1 - SMOOTHING) * value)
    return out
