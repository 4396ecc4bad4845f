"""The engine's one door to this machine: every fact app.core plans with (RAM, the NVIDIA cards,
where training runs) is asked for here, and only this module imports app.gpu. Tests stand in for a
machine they do not have by replacing these functions (monkeypatch host.local_device, ...)."""

from __future__ import annotations

import time

from app.gpu import machine, nvml


def available_ram() -> int:
    """Bytes of RAM a new program could have now (a container's memory limit included)."""
    return machine.available_ram()


def local_device() -> str:
    """"cuda" when torch can train on an NVIDIA card here, else "cpu" (no torch import without a driver)."""
    return machine.local_device()


def cuda_free(index: int = 0) -> tuple[int, int, str]:
    """(free bytes, total bytes, name) of CUDA card `index`, as torch sees it."""
    return machine.cuda_free(index)


def cuda_capability(index: int = 0) -> tuple[int, int] | None:
    """Compute capability of CUDA card `index` as torch sees it; None without CUDA."""
    return machine.cuda_capability(index)


def compute_device() -> tuple[str, str]:
    """(where training and generation run here, the dtype they compute in): bf16 on CUDA from
    Ampere on (fp16 before: is_bf16_supported() also says yes for Turing, where bf16 is emulated
    and slow), fp32 on the CPU."""
    capability = cuda_capability(0) if local_device() == "cuda" else None
    if capability is None:
        return "cpu", "float32"
    return "cuda", "bfloat16" if capability >= (8, 0) else "float16"


def gpus() -> nvml.GpuReport:
    """Every NVIDIA card NVML reports (none, with the reason, without a driver)."""
    return nvml.detect_gpus()


def memory_use(index: int = 0) -> nvml.MemoryUse | None:
    """Card `index`'s memory split into this process's, other programs' and free."""
    return nvml.memory_use(index)


def process_ram() -> int:
    """Resident RAM of this process now, in bytes (0 where the machine does not say)."""
    return int(machine.process_ram_bytes() or 0)


def process_peak_ram() -> int:
    """The most resident RAM this process has held since it started or since `reset_peak_ram`
    (0 where the machine does not say): what a CPU plan's predicted peak predicts."""
    return int(machine.process_peak_ram_bytes() or 0)


def reset_peak_ram() -> bool:
    """Count this process's peak RAM from now (Linux); False where it cannot be reset."""
    return machine.reset_process_peak_ram()


def trim_heap() -> bool:
    """Give the C heap's free memory back to the system now (glibc); see machine.trim_heap."""
    return machine.trim_heap()


_cores_seen: tuple[float, tuple[int, float | None]] | None = None
CORES_FRESH_S = 5.0  # plans made within this of a measure reuse it (a preview replans per keystroke)


def cpu_cores() -> tuple[int, float | None]:
    """(the cores this process may use, how many of them other programs keep busy now: None where
    it cannot be measured). Measured over 0.3 s, then reused for CORES_FRESH_S."""
    global _cores_seen
    now = time.monotonic()
    if _cores_seen is None or now - _cores_seen[0] > CORES_FRESH_S:
        _cores_seen = (now, (machine.usable_cores(), machine.cores_busy_elsewhere()))
    return _cores_seen[1]
