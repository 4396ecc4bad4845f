"""GPU detection never fails: no driver, no NVML, and unsupported fields are reported, not raised;
a card's memory is split into this process's and other programs', saying what was inferred.

This machine has no GPU and no NVML library, so the NVML library is replaced by a stand-in
(monkeypatched into sys.modules) that raises pynvml's own error classes, so the code under test
handles exactly what the real library would throw on such a machine. Likewise torch's CUDA is
faked where a test needs it initialised; everything else is real.
"""

from __future__ import annotations

import os
import sys
import types

import pynvml
import pytest

from app.gpu import nvml as nvml_module
from app.gpu.nvml import (NOT_SUPPORTED, GpuPoller, MemoryUse, detect_gpus, memory_use, nvidia_gpu_count,
                          torch_cuda)
from app.gpu.torch_memory import cuda_initialised, torch_counters

GIB = 2**30
OTHER_PID, DESKTOP_PID = 4242, 1717


def process(pid, used):
    """One row of NVML's process lists; `used` None as WSL and Windows report it."""
    return types.SimpleNamespace(pid=pid, usedGpuMemory=used)


def fake_nvml(init_error=None, unsupported=(), count=1, compute=(), graphics=()) -> types.ModuleType:
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
    module.nvmlDeviceGetCudaComputeCapability = answer("capability", (8, 9))
    module.nvmlDeviceGetComputeRunningProcesses = answer("processes", list(compute))
    module.nvmlDeviceGetGraphicsRunningProcesses = answer("processes", list(graphics))
    module.calls = {"init": 0, "shutdown": 0}

    def counted(name, function):
        def call(*args):
            module.calls[name] += 1
            return function(*args)
        return call

    module.nvmlInit, module.nvmlShutdown = counted("init", module.nvmlInit), counted("shutdown", module.nvmlShutdown)
    return module


def test_a_full_report(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    report = detect_gpus()
    assert report.available and report.driver == "575.51"
    card = report.gpus[0]
    assert (card.name, card.total_bytes, card.free_bytes, card.used_bytes) == (
        "NVIDIA GeForce RTX 4090", 24 * GIB, 20 * GIB, 4 * GIB)
    assert (card.reserved_bytes, card.utilization_pct, card.temperature_c, card.notes) == (GIB // 2, 37, 61, [])
    assert card.capability == (8, 9)


def test_an_unsupported_compute_capability_is_none_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(unsupported=("capability",)))
    card = detect_gpus().gpus[0]
    assert card.capability is None and card.notes == [f"compute capability: {NOT_SUPPORTED}"]
    assert card.total_bytes == 24 * GIB  # the rest of the card is still read


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


# -- whose memory is it: memory_use ------------------------------------------------------------
# The fake card: 4 GiB used (NVML v2). Other processes and this one as listed below.

def test_memory_use_splits_ours_from_each_other_process(monkeypatch):
    compute = [process(os.getpid(), GIB), process(OTHER_PID, 2 * GIB)]
    graphics = [process(DESKTOP_PID, GIB // 2), process(OTHER_PID, 2 * GIB)]  # in both lists: counted once
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(compute=compute, graphics=graphics))
    assert memory_use(0) == MemoryUse(24 * GIB, 4 * GIB, GIB, 2 * GIB + GIB // 2, True, "")
    other = memory_use(0, pid=OTHER_PID)  # any process can be asked about
    assert (other.ours_bytes, other.others_bytes) == (2 * GIB, GIB + GIB // 2)


def test_before_our_cuda_context_everything_listed_is_others(monkeypatch):
    """No CUDA context here (there is no GPU): this process is not listed, so ours is 0."""
    compute = [process(OTHER_PID, 2 * GIB)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(compute=compute, graphics=[process(DESKTOP_PID, GIB)]))
    use = memory_use(0)
    assert (use.ours_bytes, use.others_bytes, use.per_process, use.note) == (0, 3 * GIB, True, "")


def test_a_container_that_hides_our_pid_leaves_ours_unknown(monkeypatch):
    """CUDA is initialised (faked: it cannot be here), yet NVML lists only pids from elsewhere."""
    monkeypatch.setattr(nvml_module, "cuda_initialised", lambda: True)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(compute=[process(OTHER_PID, 3 * GIB)]))
    use = memory_use(0)
    assert (use.ours_bytes, use.others_bytes, use.per_process) == (None, 4 * GIB, False)
    assert "not in NVML's process list" in use.note and "ours included" in use.note


def test_without_per_process_figures_others_are_used_minus_ours(monkeypatch):
    """WSL: processes are listed, but with no memory figure for the others."""
    compute = [process(os.getpid(), GIB), process(OTHER_PID, None)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(compute=compute))
    use = memory_use(0)
    assert (use.ours_bytes, use.others_bytes, use.per_process) == (GIB, 3 * GIB, False)
    assert use.note == "per-process memory not reported here (WSL/containers); others = used - ours"


def test_without_any_figure_others_are_the_whole_card(monkeypatch):
    monkeypatch.setattr(nvml_module, "cuda_initialised", lambda: True)  # faked: we hold a context
    compute = [process(os.getpid(), None), process(OTHER_PID, None)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(compute=compute))
    use = memory_use(0)
    assert (use.ours_bytes, use.others_bytes, use.per_process) == (None, 4 * GIB, False)
    assert "ours included" in use.note


def test_an_empty_process_list_with_memory_used_is_not_trusted(monkeypatch):
    """WSL and some containers list no process while the desktop uses the card."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    use = memory_use(0)
    assert (use.ours_bytes, use.others_bytes, use.per_process) == (0, 4 * GIB, False)
    assert "lists no process" in use.note


@pytest.mark.parametrize("context", [False, True])
def test_process_lists_not_supported_are_inferred_not_raised(monkeypatch, context):
    monkeypatch.setattr(nvml_module, "cuda_initialised", lambda: context)  # faked when True
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(unsupported=("processes",)))
    use = memory_use(0)
    assert (use.total_bytes, use.used_bytes, use.per_process) == (24 * GIB, 4 * GIB, False)
    # Without a CUDA context nothing is ours; with one, ours cannot be told apart from the rest.
    assert (use.ours_bytes, use.others_bytes) == ((None, 4 * GIB) if context else (0, 4 * GIB))
    assert use.note.startswith("NVML does not list the processes")


def test_memory_use_without_nvml_or_card_is_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_error=pynvml.NVMLError_LibraryNotFound))
    assert memory_use(0) is None and GpuPoller().memory_use() is None
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(unsupported=("handle",)))
    assert memory_use(0) is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    assert memory_use(0) is None


def test_the_poller_reads_memory_use_through_its_open_handle(monkeypatch):
    fake = fake_nvml(compute=[process(os.getpid(), GIB)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    poller = GpuPoller(0)
    readings = [poller.memory_use() for _ in range(5)]
    assert all(r.ours_bytes == GIB and r.others_bytes == 0 for r in readings)
    assert fake.calls == {"init": 1, "shutdown": 0}  # NVML opened once, not once a reading
    poller.close()
    assert fake.calls["shutdown"] == 1 and poller.memory_use() is None


# -- torch's own counters ----------------------------------------------------------------------
def test_torch_counters_need_cuda_initialised():
    import torch

    assert not torch.cuda.is_initialized()  # no GPU here
    assert torch_counters(0) is None and not cuda_initialised()


def test_torch_counters_never_import_torch(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert torch_counters(0) is None and not cuda_initialised()
    assert "torch" not in sys.modules


def test_torch_counters_read_an_initialised_cuda(monkeypatch):
    """torch.cuda is faked: CUDA cannot be initialised on this machine."""
    cuda = types.SimpleNamespace(is_initialized=lambda: True, memory_allocated=lambda d: 3 * GIB,
                                 memory_reserved=lambda d: 4 * GIB, max_memory_allocated=lambda d: 5 * GIB)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert torch_counters(0) == (3 * GIB, 4 * GIB, 5 * GIB) and cuda_initialised()

    def broken(device):
        raise RuntimeError("invalid device ordinal")

    cuda.memory_allocated = broken
    assert torch_counters(7) is None  # said, not raised
