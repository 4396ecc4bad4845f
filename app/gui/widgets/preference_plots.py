"""A preference run's (dpo, orpo) graphs: the reward margin (how much more the model rewards each
pair's chosen answer than its rejected one) and the preference accuracy (the share of pairs whose
chosen answer it prefers), per training step with their moving average, and the held-out pairs'
as dots. `PreferencePlots` draws one run, live from `PreferenceMetrics` events (the Train tab) or
read back from its metrics.jsonl (the Runs tab); `PreferenceCompare` draws several runs' over one
another, each run in the colour the loss comparison above gives it. The two graphs sit side by
side, and neither has a legend: they draw as the loss graph does (faint per step, bold its moving
average, dots the held-out pairs). Both stay hidden for runs without preference measures (sft)."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QSplitter

from app.gui.widgets.plots import ComparePlot, Curve, LossPlot

MARGIN_TITLE = "Reward margin (chosen − rejected)"
ACCURACY_TITLE = "Preference accuracy"
MIN_HEIGHT = 150


class PreferencePlots(QSplitter):
    """One run's margin beside its accuracy; hidden until there is something to draw."""

    def __init__(self):
        super().__init__(Qt.Horizontal)
        self.margin = LossPlot(MARGIN_TITLE, "margin", "eval margin", MIN_HEIGHT)
        self.accuracy = LossPlot(ACCURACY_TITLE, "accuracy", "eval accuracy", MIN_HEIGHT)
        _as_share(self.accuracy)
        self.margin.getPlotItem().setXLink(self.accuracy.getPlotItem())
        for plot in (self.margin, self.accuracy):
            plot.getPlotItem().legend.setVisible(False)
            self.addWidget(plot)
        self.hide()

    def add(self, event) -> None:
        """A `PreferenceMetrics` event: a training step's measures, or the held-out pairs'."""
        if event.split == "eval":
            self.margin.add_eval(event.step, event.margin)
            self.accuracy.add_eval(event.step, event.accuracy)
        else:
            self.margin.add_step(event.step, event.margin)
            self.accuracy.add_step(event.step, event.accuracy)
        self.show()

    def clear_points(self) -> None:
        self.margin.clear_points()
        self.accuracy.clear_points()
        self.hide()

    def rewind(self, step: int) -> None:
        self.margin.rewind(step)
        self.accuracy.rewind(step)

    def refresh(self) -> None:
        self.margin.refresh()
        self.accuracy.refresh()

    def show_history(self, history) -> None:
        """Draw a past run's measures (an `app.core.runs.PreferenceHistory`; shown only if it has any)."""
        self.margin.show_points(history.steps, history.margins, history.eval_steps, history.eval_margins)
        self.accuracy.show_points(history.steps, history.accuracies, history.eval_steps, history.eval_accuracies)
        self.setVisible(bool(history))


class PreferenceCompare(QSplitter):
    """Several preference runs' margins beside their accuracies, each run in the colour the loss
    comparison gives it; hidden when none of the runs compared has preference measures."""

    def __init__(self):
        super().__init__(Qt.Horizontal)
        self.margin = ComparePlot("Reward margin, smoothed", MIN_HEIGHT)
        self.accuracy = ComparePlot(f"{ACCURACY_TITLE}, smoothed", MIN_HEIGHT)
        _as_share(self.accuracy)
        for plot in (self.margin, self.accuracy):
            plot.legend.setVisible(False)
            self.addWidget(plot)
        self.hide()

    def show_runs(self, runs, by: str = "step") -> None:
        """`runs`: (name, RunHistory, PreferenceHistory) of every run compared, in the loss graph's
        order; those without preference measures are left out here."""
        margins, accuracies = [], []
        for i, (name, history, preference) in enumerate(runs):
            if not preference:
                continue
            tokens = dict(zip(history.steps, history.tokens_through))
            margins.append(Curve(name, i, preference.steps, preference.margins, preference.eval_steps,
                                 preference.eval_margins, tokens))
            accuracies.append(Curve(name, i, preference.steps, preference.accuracies, preference.eval_steps,
                                    preference.eval_accuracies, tokens))
        self.margin.draw(margins, by)
        self.accuracy.draw(accuracies, by)
        self.setVisible(bool(margins))


def _as_share(plot) -> None:
    """A graph of a share (accuracy): 0 to 1 whatever the first steps say, drawn as percent."""
    plot.setYRange(0, 1.05, padding=0)
    plot.getPlotItem().getViewBox().setMouseEnabled(y=False)
    plot.getAxis("left").setTicks([[(v / 4, f"{v * 25}%") for v in range(5)]])
