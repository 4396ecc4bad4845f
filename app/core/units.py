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
    """A step's memory by process (StepMetrics.memory, bytes: the peak so far, the measure a plan
    predicts) in a few characters: "peak 2.1 GiB", "peak 2.1/2.2 GiB" for a run on two processes,
    the largest of more; "" without figures."""
    figures = [value / GIB for value in memory or () if value]
    if not figures:
        return ""
    if len(figures) <= 4:
        return f"{lead}peak {'/'.join(f'{value:.1f}' for value in figures)} GiB"
    top = max(range(len(figures)), key=figures.__getitem__)
    return f"{lead}peak up to {figures[top]:.1f} GiB (process {top} of {len(figures)})"


def peak_text(peak: int, predicted: int) -> str:
    """A run's measured peak against its plan's prediction: "2.92 of 3.10 GiB predicted (94 %)";
    "" before the first step."""
    if not peak:
        return ""
    if not predicted:
        return f"{peak / GIB:.2f} GiB"
    return f"{peak / GIB:.2f} of {predicted / GIB:.2f} GiB predicted ({100 * peak / predicted:.0f} %)"


def step_progress_text(progress) -> str:
    """Where a long step is (a StepProgress): "step 4/20 in progress · micro-batch 2 of 3 · backward,
    layer 12 of 30 · 236 tokens through · 1m04s so far"."""
    parts = [f"step {progress.step}/{progress.total_steps} in progress"]
    if progress.micro_batches > 1:
        parts.append(f"micro-batch {progress.micro_batch} of {progress.micro_batches}")
    parts.append(f"{progress.phase}, layer {progress.layer} of {progress.layers}")
    if progress.tokens_done:
        parts.append(f"{progress.tokens_done:,} tokens through")
    parts.append(f"{format_duration(progress.elapsed_s)} so far")
    return " · ".join(parts)
