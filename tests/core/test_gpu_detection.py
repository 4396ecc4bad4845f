"""GPU detection never fails: no driver, no NVML, and unsupported fields are reported, not raised.

The NVML library is replaced by a stand-in that raises pynvml's own error classes, so the code
under test handles exactly what the real library would throw on such a machine.
"""

from __future__ import annotations

import sys
import types

import pynvml
import pytest

from app.gpu.nvml import NOT_SUPPORTED, GpuPoller, detect_gpus, nvidia_gpu_count, torch_cuda

GIB = 2**30


def fake_nvml(init_error=None, unsupported=(), count=1) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    for name in dir(pynvml):
        if name.startswith("NVMLError") or name in ("NVML_TEMPERATURE_GPU", "nvmlMemory_v2"):
            setattr(module, name, getattr(pynvml, name))

    def answer(field, value):
        def call(*args):
            if field in unsupported:
                raise pynvml.NVMLError_NotSupported()
            return value
        return call

    def init():
        if init_error:
            raise init_error()

    module.nvmlInit = init
    module.nvmlShutdown = lambda: None
    module.nvmlSystemGetDriverVersion = answer("driver", "575.51")
    module.nvmlDeviceGetCount = answer("count", count)
    module.nvmlDeviceGetHandleByIndex = answer("handle", object())
    module.nvmlDeviceGetName = answer("name", "NVIDIA GeForce RTX 4090")
    memory = types.SimpleNamespace(total=24 * GIB, free=20 * GIB, used=4 * GIB, reserved=GIB // 2)

    def memory_info(handle, version=None):
        if "memory" in unsupported or (version is not None and "memory_v2" in unsupported):
            raise pynvml.NVMLError_NotSupported()
        return memory if version else types.SimpleNamespace(total=memory.total, free=memory.free, used=memory.used)

    module.nvmlDeviceGetMemoryInfo = memory_info
    module.nvmlDeviceGetUtilizationRates = answer("utilisation", types.SimpleNamespace(gpu=37))
    module.nvmlDeviceGetTemperature = answer("temperature", 61)
    return module


def test_a_full_report(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    report = detect_gpus()
    assert report.available and report.driver == "575.51"
    card = report.gpus[0]
    assert (card.name, card.total_bytes, card.free_bytes, card.used_bytes) == (
        "NVIDIA GeForce RTX 4090", 24 * GIB, 20 * GIB, 4 * GIB)
    assert (card.reserved_bytes, card.utilization_pct, card.temperature_c, card.notes) == (GIB // 2, 37, 61, [])


@pytest.mark.parametrize("error,message", [
    (pynvml.NVMLError_LibraryNotFound, "no NVIDIA driver found"),
    (pynvml.NVMLError_DriverNotLoaded, "driver is not loaded"),
])
def test_no_driver_is_said_not_raised(monkeypatch, error, message):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_error=error))
    report = detect_gpus()
    assert not report.available and message in report.message and report.gpus == []
    poller = GpuPoller()
    assert not poller.available and poller.poll() is None and message in poller.message


def test_no_gpu_at_all(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(count=0))
    report = detect_gpus()
    assert not report.available and "no NVIDIA GPU" in report.message


def test_the_quick_count_needs_no_driver(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(count=2))
    assert nvidia_gpu_count() == 2
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_error=pynvml.NVMLError_LibraryNotFound))
    assert nvidia_gpu_count() == 0
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(unsupported=("count",)))
    assert nvidia_gpu_count() == 0


def test_unsupported_fields_become_notes_as_in_wsl(monkeypatch):
    unsupported = ("memory_v2", "utilisation", "temperature")
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(unsupported=unsupported))
    card = detect_gpus().gpus[0]
    assert card.total_bytes == 24 * GIB and card.reserved_bytes is None  # fell back to v1 memory info
    assert card.utilization_pct is None and card.temperature_c is None
    assert card.notes == [f"utilisation: {NOT_SUPPORTED}", f"temperature: {NOT_SUPPORTED}"]
    sample = GpuPoller().poll()
    assert sample.used_bytes == 4 * GIB and sample.utilization_pct is None


def test_torch_view_on_this_machine_is_consistent():
    import torch

    view = torch_cuda()
    assert view.available == torch.cuda.is_available()
    assert view.message


def test_cli_gpu_prints_without_a_gpu(monkeypatch, capsys):
    from app.cli import main

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(unsupported=("temperature",)))
    assert main(["gpu"]) == 0
    out = capsys.readouterr().out
    assert "GPU 0: NVIDIA GeForce RTX 4090" in out and "total 24.00 GiB" in out
    assert "temperature  not reported" in out and "torch:" in out
