"""The live memory graph tells this program's GPU memory apart from other programs': a real
LiveGraphs/MemoryPlot driven offscreen, its curves read back with getData.

This machine has no GPU and no NVML library, so NVML is a stand-in module (monkeypatched into
sys.modules, raising pynvml's own errors) describing a 24 GiB card that the desktop and another
program share with us; torch's CUDA counters are faked where a test needs CUDA initialised.
The widgets, the sampling and the drawing are real.
"""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pynvml
import pytest

from app.core.config import Plan

GIB = 2**30
OTHER_PID, DESKTOP_PID = 4242, 1717


def fake_card(ours=1.5 * GIB, other=3.5 * GIB, desktop=0.5 * GIB, init_error=None) -> types.ModuleType:
    """A 24 GiB card; `ours` None lists this process without a figure, as WSL does."""
    module = types.ModuleType("pynvml")
    for name in dir(pynvml):
        if name.startswith("NVMLError") or name in ("NVML_TEMPERATURE_GPU", "nvmlMemory_v2"):
            setattr(module, name, getattr(pynvml, name))

    def init():
        if init_error:
            raise init_error()

    used = int((ours or 0) + other + desktop)
    module.nvmlInit, module.nvmlShutdown = init, lambda: None
    module.nvmlSystemGetDriverVersion = lambda: "575.51"
    module.nvmlDeviceGetCount = lambda: 1
    module.nvmlDeviceGetHandleByIndex = lambda index: object()
    module.nvmlDeviceGetName = lambda handle: "NVIDIA GeForce RTX 4090"
    module.nvmlDeviceGetMemoryInfo = lambda handle, version=None: types.SimpleNamespace(
        total=24 * GIB, free=24 * GIB - used, used=used, reserved=0)
    module.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=87)
    module.nvmlDeviceGetTemperature = lambda handle, sensor: 60
    module.nvmlDeviceGetCudaComputeCapability = lambda handle: (8, 9)
    module.nvmlDeviceGetComputeRunningProcesses = lambda handle: [
        types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=None if ours is None else int(ours)),
        types.SimpleNamespace(pid=OTHER_PID, usedGpuMemory=None if ours is None else int(other))]
    module.nvmlDeviceGetGraphicsRunningProcesses = lambda handle: [
        types.SimpleNamespace(pid=DESKTOP_PID, usedGpuMemory=None if ours is None else int(desktop))]
    return module


@pytest.fixture
def graphs(qtbot):
    """Build LiveGraphs on whatever card the test put in sys.modules; shown offscreen."""
    from app.gui.widgets.live_graphs import LiveGraphs
    from app.gui.widgets.plots import use_palette

    made = []

    def build():
        use_palette(False)
        widget = LiveGraphs()
        qtbot.addWidget(widget)
        widget.resize(700, 800)
        widget.show()
        made.append(widget)
        return widget

    yield build
    for widget in made:
        widget.close_poller()


def ys(curve) -> np.ndarray:
    return np.asarray(curve.getData()[1], dtype=float)


def legend_names(plot) -> list[str]:
    return [label.text for _, label in plot.legend.items]


def sample(widget, times: int = 3) -> None:
    for _ in range(times):
        widget.sample_memory()
    widget.refresh()


def test_our_memory_is_drawn_apart_from_other_programs(monkeypatch, graphs):
    monkeypatch.setitem(sys.modules, "pynvml", fake_card())
    widget = graphs()
    plot = widget.memory
    assert plot.gpu and plot.total_gib == 24 and plot.ceiling.isVisible() and plot.ceiling.value() == 24
    sample(widget)
    # Ours is this process's 1.5 GiB only, not the card's 5.5 GiB in use.
    assert np.allclose(ys(plot.used), 1.5)
    # Other programs (3.5 GiB + the desktop's 0.5 GiB) hang down from the 24 GiB total.
    assert np.allclose(ys(plot.other_band), 24 - 4.0) and plot.other_band.opts["fillLevel"] == 24
    assert legend_names(plot) == ["Tunesmith", "other programs"]  # no torch curves before CUDA starts
    assert "GPU busy 87 %" in plot.source_line.text and "per process" in plot.source_line.text


def test_the_predicted_peak_is_read_against_our_memory(monkeypatch, graphs):
    monkeypatch.setitem(sys.modules, "pynvml", fake_card())
    widget = graphs()
    plot = widget.memory
    assert not plot.predicted.isVisible()
    widget.show_predicted_peak(Plan(predicted_peak_bytes=2 * GIB, device="cuda"))
    sample(widget)
    assert plot.predicted.isVisible() and plot.predicted.value() == pytest.approx(2.0)
    # Under its prediction, although the whole card (5.5 GiB) is far over it.
    assert ys(plot.used).max() < plot.predicted.value()


def test_a_cpu_plan_draws_no_predicted_line(monkeypatch, graphs):
    monkeypatch.setitem(sys.modules, "pynvml", fake_card())
    widget = graphs()
    widget.show_predicted_peak(Plan(predicted_peak_bytes=2 * GIB, device="cpu"))
    assert not widget.memory.predicted.isVisible()


def test_torch_counters_appear_once_cuda_has_started(monkeypatch, graphs):
    import app.gpu.torch_memory as torch_memory

    monkeypatch.setitem(sys.modules, "pynvml", fake_card())
    widget = graphs()
    plot = widget.memory
    sample(widget, 2)
    # CUDA cannot start on this machine: torch's counters are faked from here on.
    monkeypatch.setattr(torch_memory, "torch_counters", lambda device=0: (GIB, int(1.25 * GIB), int(1.1 * GIB)))
    sample(widget, 2)
    assert legend_names(plot) == ["Tunesmith", "other programs", "torch allocated", "torch reserved"]
    allocated, reserved = ys(plot.torch_allocated), ys(plot.torch_reserved)
    assert np.isnan(allocated[:2]).all() and np.allclose(allocated[2:], 1.0)  # a gap before CUDA started
    assert np.isnan(reserved[:2]).all() and np.allclose(reserved[2:], 1.25)


def test_inferred_figures_are_said_under_the_graph(monkeypatch, graphs):
    """As on WSL: NVML lists the processes but not their memory; there is no CUDA context here,
    so ours is 0 and the whole card's use is other programs'."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_card(ours=None))
    widget = graphs()
    plot = widget.memory
    sample(widget)
    assert np.allclose(ys(plot.used), 0) and np.allclose(ys(plot.other_band), 24 - 4.0)
    assert "Per-process memory not reported here (WSL/containers)" in plot.source_line.text


def test_without_a_gpu_the_graph_shows_this_programs_ram(monkeypatch, graphs):
    monkeypatch.setitem(sys.modules, "pynvml", fake_card(init_error=pynvml.NVMLError_LibraryNotFound))
    widget = graphs()
    plot = widget.memory
    assert not plot.gpu and widget.source_text.startswith("No NVIDIA GPU")
    assert plot.getPlotItem().titleLabel.text == "RAM of this program (no GPU)"
    sample(widget, 1)
    assert plot.point_count == 1 and ys(plot.used)[0] > 0.01  # this process's RAM, in GiB
    widget.show_predicted_peak(Plan(predicted_peak_bytes=2 * GIB, device="cuda"))
    assert not plot.predicted.isVisible()


def test_a_theme_switch_recolours_the_legend(monkeypatch, graphs, qapp):
    from app.gui.theme import apply_theme
    from app.gui.widgets.plots import graph_colors

    monkeypatch.setitem(sys.modules, "pynvml", fake_card())
    widget = graphs()
    sample(widget, 1)
    labels = [label for _, label in widget.memory.legend.items] + [widget.memory.source_line]
    labels += [label for _, label in widget.loss.getPlotItem().legend.items]  # every legend, not only memory's
    assert widget.loss.getPlotItem().legend.items
    try:
        apply_theme(qapp, "dark")
        dark_text = graph_colors(True)[1]
        assert all(dark_text in label.item.toHtml() for label in labels)
    finally:
        apply_theme(qapp, "light")


def test_a_closed_poller_stops_the_sampling(monkeypatch, graphs):
    """When the window closes, the GPU graph neither samples on nor falls back to RAM figures."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_card())
    widget = graphs()
    widget.close_poller()
    sample(widget, 2)
    assert widget.memory.point_count == 0 and not widget._sampler.isActive()
