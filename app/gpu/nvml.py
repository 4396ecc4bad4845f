"""What GPUs this machine has, how much memory they have free, and who uses it, through NVML (pynvml).

Everything here degrades gracefully: without a driver or the NVML library the report says why
and carries on; a field a platform does not support (WSL, containers, some consumer cards) is
None with a note, never an exception. `memory_use` splits a card's used memory into this
process's and everyone else's; `GpuPoller` is the cheap reading for live graphs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from app.gpu.torch_memory import cuda_initialised

NOT_SUPPORTED = "not supported here (WSL, containers and some cards hide it)"


@dataclass
class GpuInfo:
    """One card as NVML sees it; None where the platform does not report a field."""

    index: int
    name: str
    total_bytes: int | None
    free_bytes: int | None
    used_bytes: int | None
    reserved_bytes: int | None = None  # NVML v2 memory info: driver/firmware reservation
    utilization_pct: int | None = None
    temperature_c: int | None = None
    notes: list[str] = field(default_factory=list)
    capability: tuple[int, int] | None = None  # CUDA compute capability, (8, 9) for an RTX 4090


@dataclass
class TorchCuda:
    """torch's own view of CUDA, which is what training will use."""

    available: bool
    devices: list[dict] = field(default_factory=list)  # name, capability "8.9", bf16
    message: str = ""


@dataclass
class MemoryUse:
    """Who uses a card's memory: this process ("ours") and everyone else ("others"), in bytes.

    `used_bytes` is NVML's figure for the whole card (the desktop, a browser, other programs and
    us). `ours_bytes` comes from NVML's per-process lists: 0 while this process has no CUDA context
    on the card, None where NVML will not say (WSL and containers often report no memory per
    process, or pids from another namespace). `others_bytes` is the sum of the other processes'
    figures when every process has one (`per_process`), else used - ours, else used (ours unknown).
    `note` says in a short sentence what had to be inferred; empty when nothing was.
    """

    total_bytes: int | None
    used_bytes: int | None
    ours_bytes: int | None
    others_bytes: int | None
    per_process: bool
    note: str = ""


@dataclass
class GpuReport:
    available: bool
    driver: str | None
    gpus: list[GpuInfo]
    message: str = ""


def detect_gpus() -> GpuReport:
    """All cards with memory, utilisation and temperature; never raises."""
    nvml = _init()
    if isinstance(nvml, str):
        return GpuReport(False, None, [], nvml)
    try:
        driver = _call(nvml, nvml.nvmlSystemGetDriverVersion)
        count = _call(nvml, nvml.nvmlDeviceGetCount) or 0
        gpus = [_read_card(nvml, i) for i in range(count)]
        message = "" if gpus else "NVML found no NVIDIA GPU"
        return GpuReport(bool(gpus), _text(driver), gpus, message)
    finally:
        _shutdown(nvml)


def nvidia_gpu_count() -> int:
    """How many NVIDIA cards the driver reports: 0 without a driver or NVML. Milliseconds, where
    asking torch would first cost a second or more of importing it."""
    nvml = _init()
    if isinstance(nvml, str):
        return 0
    try:
        return _call(nvml, nvml.nvmlDeviceGetCount) or 0
    finally:
        _shutdown(nvml)


def memory_use(index: int = 0, pid: int | None = None) -> MemoryUse | None:
    """How card `index`'s memory splits between process `pid` (this one by default) and the rest;
    None without NVML or without that card. Never raises. Opens and closes NVML each call: for
    readings every second, keep a `GpuPoller` and call its `memory_use`."""
    nvml = _init()
    if isinstance(nvml, str):
        return None
    try:
        handle = _call(nvml, nvml.nvmlDeviceGetHandleByIndex, index)
        return None if handle is None else _read_memory_use(nvml, handle, pid)
    finally:
        _shutdown(nvml)


def torch_cuda() -> TorchCuda:
    """Whether torch can train on CUDA, with each device's compute capability and bf16 support."""
    try:
        import torch
    except ImportError:
        return TorchCuda(False, message="torch is not installed")
    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no usable CUDA device"
        return TorchCuda(False, message=f"torch {torch.__version__}: {build}")
    devices = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        devices.append({"name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}",
                        "bf16": major >= 8})
    return TorchCuda(True, devices, f"torch {torch.__version__}, CUDA {torch.version.cuda}")


@dataclass
class GpuSample:
    used_bytes: int | None
    total_bytes: int | None
    utilization_pct: int | None


class GpuPoller:
    """Keeps NVML open for cheap repeated readings of one card (about once a second for graphs)."""

    def __init__(self, index: int = 0):
        self._nvml = _init()
        self._handle = None
        self.message = self._nvml if isinstance(self._nvml, str) else ""
        if not self.message:
            self._handle = _call(self._nvml, self._nvml.nvmlDeviceGetHandleByIndex, index)
            if self._handle is None:
                self.message = f"no GPU {index}"

    @property
    def available(self) -> bool:
        return self._handle is not None

    def poll(self) -> GpuSample | None:
        if self._handle is None:
            return None
        nvml = self._nvml
        memory = _call(nvml, nvml.nvmlDeviceGetMemoryInfo, self._handle)
        rates = _call(nvml, nvml.nvmlDeviceGetUtilizationRates, self._handle)
        return GpuSample(getattr(memory, "used", None), getattr(memory, "total", None),
                         getattr(rates, "gpu", None))

    def memory_use(self, pid: int | None = None) -> MemoryUse | None:
        """`memory_use` for this poller's card, through the handle it keeps open."""
        if self._handle is None:
            return None
        return _read_memory_use(self._nvml, self._handle, pid)

    def close(self) -> None:
        if self._handle is not None:
            _shutdown(self._nvml)
            self._handle = None


# -- helpers ----------------------------------------------------------------------------------
def _init():
    """The pynvml module, initialised; or a string saying why there is no NVML."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return "no NVIDIA driver found (the NVML library is missing)"
    except pynvml.NVMLError_DriverNotLoaded:
        return "the NVIDIA driver is not loaded"
    except pynvml.NVMLError as err:
        return f"NVML could not start: {err}"
    return pynvml


def _shutdown(nvml) -> None:
    try:
        nvml.nvmlShutdown()
    except nvml.NVMLError:
        pass


def _call(nvml, function, *args, notes: list[str] | None = None, what: str = ""):
    """function(*args), or None when NVML cannot answer (a note says so when `notes` is given)."""
    try:
        return function(*args)
    except nvml.NVMLError_NotSupported:
        if notes is not None:
            notes.append(f"{what}: {NOT_SUPPORTED}")
    except nvml.NVMLError as err:
        if notes is not None:
            notes.append(f"{what}: {err}")
    return None


def _read_card(nvml, index: int) -> GpuInfo:
    notes: list[str] = []
    handle = _call(nvml, nvml.nvmlDeviceGetHandleByIndex, index, notes=notes, what="handle")
    if handle is None:
        return GpuInfo(index, "unknown", None, None, None, notes=notes)
    name = _text(_call(nvml, nvml.nvmlDeviceGetName, handle, notes=notes, what="name")) or "unknown"
    memory = None
    if hasattr(nvml, "nvmlMemory_v2"):
        memory = _call(nvml, nvml.nvmlDeviceGetMemoryInfo, handle, nvml.nvmlMemory_v2)
    if memory is None:
        memory = _call(nvml, nvml.nvmlDeviceGetMemoryInfo, handle, notes=notes, what="memory")
    rates = _call(nvml, nvml.nvmlDeviceGetUtilizationRates, handle, notes=notes, what="utilisation")
    temperature = _call(nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU,
                        notes=notes, what="temperature")
    capability = _call(nvml, nvml.nvmlDeviceGetCudaComputeCapability, handle, notes=notes,
                       what="compute capability")
    return GpuInfo(index, name, getattr(memory, "total", None), getattr(memory, "free", None),
                   getattr(memory, "used", None), getattr(memory, "reserved", None),
                   getattr(rates, "gpu", None), temperature, notes,
                   (int(capability[0]), int(capability[1])) if capability else None)


def _read_memory_use(nvml, handle, pid: int | None) -> MemoryUse:
    """The card's used memory split into process `pid`'s and the others'; see `MemoryUse`."""
    pid = os.getpid() if pid is None else pid
    memory = _memory_info(nvml, handle)
    total, used = getattr(memory, "total", None), getattr(memory, "used", None)
    processes = _processes(nvml, handle)
    if processes is None:
        return _inferred(total, used, pid, "NVML does not list the processes on this card here")
    mine = [bytes_ for p, bytes_ in processes.items() if p == pid]
    theirs = [bytes_ for p, bytes_ in processes.items() if p != pid]
    if not mine and pid == os.getpid() and cuda_initialised():
        # We hold a CUDA context, yet NVML lists no such pid: a container shows other pids.
        return _inferred(total, used, pid, "this process is not in NVML's process list (containers "
                                           "show other pids)")
    if not processes:
        # Nothing listed: an idle card, or WSL and containers, which list none while memory is used.
        return _inferred(total, used, pid, "NVML lists no process on this card")
    if None in mine or None in theirs:
        # WSL and Windows (WDDM) list processes without their memory.
        return _inferred(total, used, pid, "per-process memory not reported here (WSL/containers)",
                         ours=None if None in mine else sum(mine))
    return MemoryUse(total, used, sum(mine), sum(theirs), True)


def _inferred(total, used, pid: int, why: str, ours: int | None = None) -> MemoryUse:
    """A MemoryUse without per-process figures for the others: ours from `ours`, or 0 when this
    process has no CUDA context yet; others = used - ours, or the whole of used when ours is unknown."""
    if ours is None and pid == os.getpid() and not cuda_initialised():
        ours = 0  # no CUDA context in this process: nothing on the card is ours
    if used is None:
        return MemoryUse(total, None, ours, None, False, f"{why}; the card's use is not reported")
    if ours is None:
        return MemoryUse(total, used, None, used, False, f"{why}; others = the whole card's use, ours included")
    return MemoryUse(total, used, ours, max(used - ours, 0), False, f"{why}; others = used - ours")


def _memory_info(nvml, handle):
    """NVML v2 memory info where the driver has it (its "used" leaves out the driver's own
    reservation, which is no program's), else v1; None when neither answers."""
    memory = None
    if hasattr(nvml, "nvmlMemory_v2"):
        memory = _call(nvml, nvml.nvmlDeviceGetMemoryInfo, handle, nvml.nvmlMemory_v2)
    return memory if memory is not None else _call(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)


def _processes(nvml, handle) -> dict[int, int | None] | None:
    """{pid: bytes on the card, None where not reported} over the compute and graphics processes;
    None when NVML lists neither. A process in both lists (CUDA and a display) counts once."""
    found: dict[int, int | None] | None = None
    for kind in ("Compute", "Graphics"):
        listed = _process_list(nvml, handle, kind)
        if listed is None:
            continue
        found = {} if found is None else found
        for process in listed:
            pid, bytes_ = getattr(process, "pid", None), getattr(process, "usedGpuMemory", None)
            if pid is None:
                continue
            known = [b for b in (found.get(pid), bytes_) if b is not None]
            found[pid] = max(known) if known else None
    return found


def _process_list(nvml, handle, kind: str) -> list | None:
    """NVML's list of `kind` ("Compute" or "Graphics") processes: the newest call this pynvml has
    (v3), then v2 for older drivers; None when neither answers (WSL often says NotSupported)."""
    failures = (nvml.NVMLError, getattr(nvml, "NVMLLibraryMismatchError", nvml.NVMLError))
    for suffix in ("", "_v2"):
        function = getattr(nvml, f"nvmlDeviceGet{kind}RunningProcesses{suffix}", None)
        if function is None:
            continue
        try:
            return list(function(handle))
        except failures:
            continue
    return None


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
