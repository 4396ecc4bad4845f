"""What GPUs this machine has and how much memory they have free, through NVML (pynvml).

Everything here degrades gracefully: without a driver or the NVML library the report says why
and carries on; a field a platform does not support (WSL, containers, some consumer cards) is
None with a note, never an exception. `GpuPoller` is the cheap reading for live graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class TorchCuda:
    """torch's own view of CUDA, which is what training will use."""

    available: bool
    devices: list[dict] = field(default_factory=list)  # name, capability "8.9", bf16
    message: str = ""


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
    return GpuInfo(index, name, getattr(memory, "total", None), getattr(memory, "free", None),
                   getattr(memory, "used", None), getattr(memory, "reserved", None),
                   getattr(rates, "gpu", None), temperature, notes)


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
