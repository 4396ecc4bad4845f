"""Facts about this machine the engine plans with: RAM (a container's limit included), this
process's resident memory, and where training would run (NVML first, which answers in
milliseconds without importing torch; then torch). NVIDIA card details are in nvml.py and
torch_memory.py; app.core reaches all of this through app.core.host only."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from app.gpu.nvml import nvidia_gpu_count

GIB = 1024 ** 3
MEMINFO = Path("/proc/meminfo")  # Linux; elsewhere (Windows, macOS) psutil answers
STATM = Path("/proc/self/statm")
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _read(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace")  # /proc and /sys: ASCII


def available_ram() -> int:
    """Bytes of RAM the system could give a new program now: MemAvailable on Linux, less when this
    process runs in a container or cgroup with a memory limit (Docker, a rented box's job slot)."""
    try:
        for line in _read(MEMINFO).splitlines():
            if line.startswith("MemAvailable:"):
                return min(int(line.split()[1]) * 1024, cgroup_available() or 2**62)
    except OSError:
        pass
    try:
        import psutil  # Windows and macOS: what their memory managers call available

        return int(psutil.virtual_memory().available)
    except (ImportError, OSError, AttributeError):
        return 8 * GIB  # an unknown system: assume a modest machine


def cgroup_available(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's cgroup memory limit (the tightest of it and its parents),
    counting inactive file cache as free as the kernel would reclaim it; None without a limit."""
    try:
        lines = _read(proc_cgroup).splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        v2 = controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        base = root if v2 else root / "memory"
        folder = base / path.lstrip("/")
        if not folder.is_dir():
            folder = base  # inside a container the cgroup's own folder is the mount's root
        while True:
            left = _cgroup_left(folder, v2)
            if left is not None:
                best = left if best is None else min(best, left)
            if folder == base or not v2:  # v1 reports the hierarchy's limit in memory.stat itself
                break
            folder = folder.parent
    return best


def _cgroup_left(folder: Path, v2: bool) -> int | None:
    try:
        stat = dict(line.split() for line in _read(folder / "memory.stat").splitlines() if " " in line)
        if v2:
            limit_text = _read(folder / "memory.max").strip()
            if limit_text == "max":
                return None
            limit, used = int(limit_text), int(_read(folder / "memory.current"))
            cache = int(stat.get("inactive_file", 0))
        else:
            limit = min(int(_read(folder / "memory.limit_in_bytes")),
                        int(stat.get("hierarchical_memory_limit", 2**63)))
            used, cache = int(_read(folder / "memory.usage_in_bytes")), int(stat.get("total_inactive_file", 0))
    except (OSError, ValueError):
        return None
    if limit >= 2**60:
        return None
    return max(0, limit - used + cache)


def local_device() -> str:
    """Where training would run here. Without an NVIDIA driver that is the CPU, which NVML tells
    in milliseconds; with one, torch decides (a CPU build of torch cannot use the card)."""
    if "torch" not in sys.modules and nvidia_gpu_count() == 0:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_free(index: int = 0) -> tuple[int, int, str]:
    """(free bytes, total bytes, name) of CUDA card `index`, as torch sees it."""
    import torch

    free, total = torch.cuda.mem_get_info(index)
    return int(free), int(total), torch.cuda.get_device_name(index)


def cuda_capability(index: int = 0) -> tuple[int, int] | None:
    """CUDA card `index`'s compute capability as torch sees it; None when torch has no CUDA."""
    import torch

    return tuple(torch.cuda.get_device_capability(index)) if torch.cuda.is_available() else None


def process_peak_ram_bytes() -> int | None:
    """The most resident memory this process has held since it started or since
    `reset_process_peak_ram` (Linux: VmHWM; Windows: the peak working set; macOS: ru_maxrss, which
    cannot be reset). None where the machine does not say."""
    try:
        for line in _read(STATUS).splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        info = psutil.Process().memory_info()
        if hasattr(info, "peak_wset"):
            return int(info.peak_wset)
    except (ImportError, OSError, AttributeError):
        pass
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError, AttributeError):
        return None


def reset_process_peak_ram() -> bool:
    """Start this process's peak resident memory again from what it holds now (Linux: writing 5 to
    /proc/self/clear_refs); False where it cannot be reset."""
    try:
        with open(CLEAR_REFS, "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> bool:
    """Give the C heap's free memory back to the system now (glibc's malloc_trim): what the dataset
    check and tokenising freed stays resident otherwise, and would count in a CPU plan's baseline.
    One call, no lasting cost. (Fixed 1 MiB mmap/trim thresholds instead lowered the demo's peak
    from 4.4 to 2.95 GiB but made its steps 55-65 % slower: not used.) False off glibc."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False  # musl and others: their own malloc


def process_ram_bytes() -> int | None:
    """Resident memory of this process now (Linux /proc; elsewhere psutil: the working set on
    Windows, the resident size on macOS)."""
    try:
        pages = int(_read(STATM).split()[1])

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except (ImportError, OSError, AttributeError):
        return None


PROC_STAT = Path("/proc/stat")


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's share), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cores_busy_elsewhere(sample_s: float = 0.3) -> float | None:
    """How many of the cores this process may use other programs keep busy now: those cores' CPU
    time over `sample_s` less this process's own, in cores (Linux /proc/stat); None where it
    cannot be measured."""
    import time

    try:
        mine = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        mine = None

    def busy_and_total() -> tuple[float, float]:
        busy = total = 0.0
        for line in _read(PROC_STAT).splitlines():
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            if mine is not None and int(name[3:]) not in mine:
                continue
            values = [float(v) for v in fields[:8]]
            total += sum(values)
            busy += sum(values) - values[3] - values[4]  # less idle and iowait
        return busy, total

    try:
        busy0, total0 = busy_and_total()
        own0, wall0 = sum(os.times()[:2]), time.monotonic()
        time.sleep(sample_s)
        busy1, total1 = busy_and_total()
        own1, wall1 = sum(os.times()[:2]), time.monotonic()
    except (OSError, IndexError, ValueError):
        return None
    if total1 <= total0:
        return None
    cores = len(mine) if mine is not None else (os.cpu_count() or 1)
    busy_cores = (busy1 - busy0) / (total1 - total0) * cores  # every process, this one included
    own_cores = (own1 - own0) / max(1e-6, wall1 - wall0)
    return max(0.0, busy_cores - own_cores)
