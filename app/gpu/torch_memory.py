"""torch's own memory counters for a CUDA device, read only when they can be had for free.

The live memory graph wants torch's allocated and reserved bytes beside NVML's per-process
figure, but the window must never pay for importing torch (seconds) or initialising CUDA (a
context of several hundred MiB on the card). So these functions look only at a torch that some
other part of the program has already imported and whose CUDA is already initialised; otherwise
they answer None (or False). They never import torch and never raise.
"""

from __future__ import annotations

import sys


def torch_counters(device: int = 0) -> tuple[int, int, int] | None:
    """(memory_allocated, memory_reserved, max_memory_allocated) of CUDA `device`, in bytes; None
    when torch is not imported, CUDA is not initialised in this process, or torch cannot answer."""
    torch = _initialised_torch()
    if torch is None:
        return None
    try:
        return (int(torch.cuda.memory_allocated(device)), int(torch.cuda.memory_reserved(device)),
                int(torch.cuda.max_memory_allocated(device)))
    except Exception:  # noqa: BLE001 - a bad index or a torch without these counters: no figures, no crash
        return None


def cuda_initialised() -> bool:
    """Whether this process has already initialised CUDA through torch (so it holds a context on a
    card); False when torch is not imported. Never imports torch."""
    return _initialised_torch() is not None


def _initialised_torch():
    """The imported torch module when its CUDA is initialised, else None."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch if torch.cuda.is_initialized() else None
    except Exception:  # noqa: BLE001 - a half-imported or CPU-only torch: treat as not initialised
        return None
