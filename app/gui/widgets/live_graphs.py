"""The Train tab's live graphs: loss, a preference run's margin and accuracy (preference_plots.py,
shown only for dpo and orpo runs), learning rate and memory stacked, redrawn on one timer, with
memory sampled once a second (on a GPU, this program's memory apart from other programs'; see
`MemoryPlot`).
"""

from __future__ import annotations

import html
import time

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QSplitter

from app.core.units import GIB
from app.gpu.machine import process_peak_ram_bytes, process_ram_bytes
from app.gpu.nvml import GpuPoller
from app.gui.widgets.plots import REDRAW_MS, LearningRatePlot, LossPlot, curve, set_up
from app.gui.widgets.preference_plots import PreferencePlots

MEMORY_SAMPLE_MS = 1000
# the graphs' shares of the height once a preference run's appear: loss, preference, lr, memory
PREFERENCE_SHARES = (0.36, 0.26, 0.14, 0.24)

OURS_COLOR = (200, 80, 160)
ALLOCATED_COLOR = (40, 110, 220)
RESERVED_COLOR = (0, 160, 170)
OTHERS_COLOR = (128, 128, 128)
PREDICTED_COLOR = (230, 120, 30)
TOTAL_COLOR = (200, 40, 40)


class MemoryPlot(pg.PlotWidget):
    """Memory over time, in GiB, with the plan's predicted peak as a dashed line.

    Without a GPU (`gpu=False`) one curve: this program's RAM. On a GPU the card is shared with
    the desktop, a browser and other programs, so the graph keeps them apart:
    - "Tunesmith": this process's memory on the card (NVML, per process), drawn from 0;
    - "torch allocated" and "torch reserved": torch's own counters, once training has started CUDA;
    - "other programs": everyone else's memory, a grey band hanging down from the card's total.
    The predicted peak and the "Tunesmith" curve share the axis directly: both are this process's
    own memory (the estimator's figure includes the CUDA context and the allocator's slack), so
    the curve staying under the dashed line means the prediction held. The band hangs from the
    total rather than stacking under our curve so that its lower edge is the room left to us:
    our curve touching it means the card is full. The line under the legend says which figures
    NVML reported per process and which were inferred.
    """

    def __init__(self, gpu: bool = False):
        super().__init__()
        self.gpu = gpu
        set_up(self, "Memory", "seconds", 200 if gpu else 160)
        self.setLabel("left", "GiB")
        self.getAxis("left").enableAutoSIPrefix(False)
        self.predicted = pg.InfiniteLine(angle=0, pen=pg.mkPen(PREDICTED_COLOR, width=1.5, style=Qt.DashLine),
                                         label="predicted peak {value:.1f} GiB",
                                         labelOpts={"position": 0.02, "color": PREDICTED_COLOR,
                                                    "anchors": [(0, 0), (0, 0)]})  # starts in view
        self.ceiling = pg.InfiniteLine(angle=0, pen=pg.mkPen(TOTAL_COLOR, width=1.5), label="total {value:.1f} GiB",
                                       labelOpts={"position": 0.02, "color": TOTAL_COLOR, "anchors": [(0, 1), (0, 1)]})
        for line in (self.predicted, self.ceiling):
            line.setVisible(False)
            self.addItem(line)
        self.total_gib = None
        self.times, self.values = [], []  # values: RAM, or this process's GPU memory
        self.others, self.allocated, self.reserved = [], [], []
        if gpu:
            self._set_up_gpu_curves()
        else:
            self.addLegend(offset=(-10, 10))
            self.used = curve(self, OURS_COLOR, 2, name="in use")
            # the measure the predicted peak predicts: the most this program has held since the plan
            self.peak = curve(self, OURS_COLOR, 1.3, Qt.DashLine, name="peak since planned")
        self.peaks: list[float] = []
        self._dirty = True

    def _set_up_gpu_curves(self) -> None:
        """The curves of the GPU view, with the legend and the source line under the graph."""
        item = self.getPlotItem()
        self.legend = pg.LegendItem(colCount=3, horSpacing=12, labelTextSize="8pt", frame=False)
        item.layout.addItem(self.legend, 4, 1)
        self.source_line = pg.LabelItem("", size="8pt", justify="left")
        item.layout.addItem(self.source_line, 5, 1)
        self.other_band = curve(self, OTHERS_COLOR, 1)
        self.other_band.setBrush(pg.mkBrush(*OTHERS_COLOR[:3], 70))
        self.used = curve(self, OURS_COLOR, 2.4)
        self.torch_reserved = curve(self, RESERVED_COLOR, 1.3)
        self.torch_allocated = curve(self, ALLOCATED_COLOR, 1.3, Qt.DashLine)
        self.legend.addItem(self.used, "Tunesmith")
        self.legend.addItem(self.other_band, "other programs")
        self._torch_in_legend = False
        self.source_note = ""  # the source line: what NVML reported per process, what was inferred

    def set_source(self, title: str) -> None:
        self.setTitle(title)

    def setBackground(self, background) -> None:
        """On a theme switch (`theme.restyle_plot`, after `use_palette`) also recolour the line
        under the GPU graph, which a LabelItem bakes in when it is set (restyle_plot does the
        legends)."""
        super().setBackground(background)
        if getattr(self, "gpu", False):
            self.source_line.setText(self.source_line.text)

    def set_predicted(self, gib: float | None) -> None:
        self.predicted.setVisible(bool(gib))
        if gib:
            self.predicted.setValue(gib)

    def set_total(self, gib: float | None) -> None:
        self.total_gib = gib
        self.ceiling.setVisible(bool(gib))
        if gib:
            self.ceiling.setValue(gib)
            if self.gpu:  # the whole card, so the band of other programs hangs from the top
                self.setYRange(0, gib * 1.15, padding=0)
        self._dirty = True

    def add_sample(self, seconds: float, used_gib: float, peak_gib: float | None = None) -> None:
        """One reading of this program's RAM (without a GPU): in use now, and its peak since the
        run was planned (the figure the predicted peak is read against)."""
        self.times.append(seconds)
        self.values.append(used_gib)
        self.peaks.append(np.nan if peak_gib is None else peak_gib)
        self._dirty = True

    def add_gpu_sample(self, seconds: float, use, counters=None, utilisation_pct: int | None = None) -> None:
        """One reading of the card: `use` an `app.gpu.nvml.MemoryUse`, `counters` torch's (allocated,
        reserved, max allocated) bytes or None; unknown figures leave a gap in their curve."""
        if use.total_bytes and use.total_bytes / GIB != self.total_gib:
            self.set_total(use.total_bytes / GIB)
        allocated, reserved = (counters or (None, None))[:2]
        self.times.append(seconds)
        for values, figure in ((self.values, use.ours_bytes), (self.others, use.others_bytes),
                               (self.allocated, allocated), (self.reserved, reserved)):
            values.append(np.nan if figure is None else figure / GIB)
        if counters and not self._torch_in_legend:
            self._torch_in_legend = True
            self.legend.addItem(self.torch_allocated, "torch allocated")
            self.legend.addItem(self.torch_reserved, "torch reserved")
        note = use.note or "Tunesmith and other programs: NVML's figures per process"
        note = note[:1].upper() + note[1:]
        if utilisation_pct is not None:
            note = f"GPU busy {utilisation_pct} %. {note}"
        if note != self.source_note:
            self.source_note = note
            self.source_line.setText(html.escape(note))
        self._dirty = True

    def refresh(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        times = np.asarray(self.times, dtype=float)
        self.used.setData(times, np.asarray(self.values, dtype=float))
        if not self.gpu:
            self.peak.setData(times, np.asarray(self.peaks, dtype=float))
            tops = [value for value in (*self.values[-1:], *self.peaks[-1:]) if value == value]
            if self.predicted.isVisible():
                tops.append(self.predicted.value())
            if tops:  # room above the highest line for the legend, which the curve never runs over
                self.setYRange(0, max(tops) * 1.35, padding=0)
            return
        others = np.asarray(self.others, dtype=float)
        if self.total_gib:  # hanging from the total: the band's lower edge is the room left to us
            self.other_band.setData(times, self.total_gib - others)
            self.other_band.setFillLevel(self.total_gib)
        else:
            self.other_band.setData(times, others)
            self.other_band.setFillLevel(0)
        self.torch_allocated.setData(times, np.asarray(self.allocated, dtype=float))
        self.torch_reserved.setData(times, np.asarray(self.reserved, dtype=float))

    @property
    def point_count(self) -> int:
        return len(self.times)


class LiveGraphs(QSplitter):
    """The graphs stacked, redrawn on one timer, with memory sampled once a second (on the GUI
    thread; NVML answers in microseconds) from the first GPU or, without one, this process's RAM.
    The preference graphs appear with a run's first `PreferenceMetrics` (`add_preference`)."""

    def __init__(self):
        from app.gpu.nvml import detect_gpus  # at call time: tests replace detect_gpus there

        super().__init__(Qt.Vertical)
        self._poller = None
        report = detect_gpus()
        self.loss, self.lr, self.memory = LossPlot(), LearningRatePlot(), MemoryPlot(gpu=report.available)
        self.preference = PreferencePlots()
        for plot in (self.loss, self.preference, self.lr, self.memory):
            self.addWidget(plot)
        self.setSizes([400, 300, 150, 250])
        self.source_text = self._choose_memory_source(report)
        self.cards = len(report.gpus)  # this machine's NVIDIA cards, for the GPU count
        self._started = time.monotonic()
        self._redraw = QTimer(self, interval=REDRAW_MS, timeout=self.refresh)
        self._sampler = QTimer(self, interval=MEMORY_SAMPLE_MS, timeout=self.sample_memory)
        self._redraw.start()
        self._sampler.start()

    def _choose_memory_source(self, report) -> str:
        """Set up the memory graph; returns a line (HTML) saying what it shows."""
        if not report.available:
            self.memory.set_source("RAM of this program (no GPU)")
            return (f"No NVIDIA GPU ({html.escape(report.message)}): training runs on the CPU, slowly. "
                    "The graph shows this program's RAM.")
        card = report.gpus[0]
        total, free = (card.total_bytes or 0) / GIB, (card.free_bytes or 0) / GIB
        self._poller = GpuPoller(0)
        self.memory.set_source(f"GPU memory: {card.name}")
        self.memory.set_total(total or None)
        return f"{html.escape(card.name or 'GPU 0')}: {total:.1f} GiB, {free:.1f} GiB free"

    def clear(self) -> None:
        self.loss.clear_points()
        self.lr.clear_points()
        self.preference.clear_points()

    def rewind(self, step: int) -> None:
        self.loss.rewind(step)
        self.lr.rewind(step)
        self.preference.rewind(step)

    def add_preference(self, event) -> None:
        """A preference run's `PreferenceMetrics`: its graphs appear with the first."""
        hidden = self.preference.isHidden()
        self.preference.add(event)
        if hidden:
            self._make_room()

    def show_run(self, run) -> None:
        """A past run's curves so far (an `app.core.runs.Run`, about to be resumed)."""
        from app.core.runs import read_history  # here: the window opens before the engine's modules load

        history = read_history(run)
        self.loss.show_history(history)
        self.lr.show_history(history)
        self.preference.show_history(history.preference)
        if not self.preference.isHidden():
            self._make_room()

    def _make_room(self) -> None:
        """Give the preference graphs their share of the height (a splitter gives a widget that
        appears only what the others can spare)."""
        total = sum(self.sizes())
        self.setSizes([int(total * share) for share in PREFERENCE_SHARES])

    def show_predicted_peak(self, plan) -> None:
        """The plan's predicted peak as a line, when the graph shows the device the plan is for: on
        a GPU read against the "Tunesmith" curve, on the CPU against "peak since planned" (both
        this process's own memory, the measure the estimate predicts)."""
        shows = (plan is not None and plan.predicted_peak_bytes and
                 (plan.device == "cuda" and self._poller is not None or plan.device == "cpu" and not self.memory.gpu))
        self.memory.set_predicted(plan.predicted_peak_bytes / GIB if shows else None)

    def refresh(self) -> None:
        for plot in (self.loss, self.preference, self.lr, self.memory):
            plot.refresh()

    def sample_memory(self) -> None:
        from app.gpu.torch_memory import torch_counters  # at call time: tests replace torch_counters there

        seconds = time.monotonic() - self._started
        if self.memory.gpu:
            use = self._poller.memory_use() if self._poller is not None else None
            if use is not None:
                sample = self._poller.poll()
                self.memory.add_gpu_sample(seconds, use, torch_counters(0), sample and sample.utilization_pct)
            return
        ram, peak = process_ram_bytes(), process_peak_ram_bytes()
        if ram:
            self.memory.add_sample(seconds, ram / GIB, peak / GIB if peak else None)

    def close_poller(self) -> None:
        """Stop sampling memory and close NVML (the window is closing)."""
        self._sampler.stop()
        if self._poller is not None:
            self._poller.close()
            self._poller = None
