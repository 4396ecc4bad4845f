"""Units both faces show: bytes as GiB and seconds as a duration, written one way everywhere."""

from __future__ import annotations

GIB = 1024 ** 3
MIB = 1024 ** 2


def gib(value: float, digits: int = 2) -> str:
    """Bytes as GiB: gib(3 * 2**30) == "3.00 GiB"; gib(x, 1) for one decimal."""
    return f"{value / GIB:.{digits}f} GiB"


def size_text(value: float) -> str:
    """Bytes as a reader wants them: "3.2 GiB" from 1 GiB up, "374 MiB" below, "12 KiB" below a MiB."""
    if value >= GIB:
        return f"{value / GIB:.1f} GiB"
    if value >= MIB:
        return f"{value / MIB:.0f} MiB"
    return f"{max(value, 0) / 1024:.0f} KiB"


def format_duration(seconds: float) -> str:
    """An ETA or elapsed time as the CLI and the app show it: 7m05s, 2h13m."""
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def memory_text(memory, lead: str = "") -> str:
    """A step's memory by process (StepMetrics.memory, bytes) in a few characters: "memory 2.1 GiB",
    "memory 2.1/2.2 GiB" for a run on two processes, the largest of more; "" without figures."""
    figures = [value / GIB for value in memory or () if value]
    if not figures:
        return ""
    if len(figures) <= 4:
        return f"{lead}memory {'/'.join(f'{value:.1f}' for value in figures)} GiB"
    top = max(range(len(figures)), key=figures.__getitem__)
    return f"{lead}memory up to {figures[top]:.1f} GiB (process {top} of {len(figures)})"
