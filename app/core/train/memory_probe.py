"""Measure what a model really holds, to check the estimator against: bytes of the quantised
weights, of the LoRA weights and optimizer state, and the peak of a block of work.

On CUDA the peak is torch's own `max_memory_allocated`/`max_memory_reserved`. On CPU there is no
such counter, so `PeakMemory` replays the allocator's events recorded by the torch profiler
(`profile_memory=True`): the same bookkeeping, every tensor allocation and free in order.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WeightBytes:
    """Bytes a loaded QLoRA model holds, by kind."""

    quantized: int  # packed 4-bit weights and their quantisation constants
    kept: int  # every other frozen weight and buffer (embeddings, norms, lm_head)
    lora: int  # trainable LoRA weights


def weight_bytes(model) -> WeightBytes:
    """Count the storage of `model`'s parameters and buffers, 4-bit quantisation state included."""
    quantized = kept = lora = 0
    seen: set[int] = set()
    for param in list(model.parameters()) + list(model.buffers()):
        if param.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(param.data_ptr())
        size = param.numel() * param.element_size()
        if type(param).__name__ == "Params4bit":
            quantized += size + _quant_state_bytes(getattr(param, "quant_state", None))
        elif param.requires_grad:
            lora += size
        else:
            kept += size
    return WeightBytes(quantized, kept, lora)


def optimizer_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors (moments, quantisation statistics)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if hasattr(value, "element_size"):
                total += value.numel() * value.element_size()
    return total


class PeakMemory:
    """`with PeakMemory(device) as probe: ...` then `probe.peak`: the most bytes allocated at once
    during the block, above what was allocated when it began (`probe.reserved` too on CUDA)."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0
        self.reserved = 0

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
            self.reserved = torch.cuda.max_memory_reserved()
            return
        self._profile.__exit__(*exc)
        events = sorted((e.start_ns(), e.nbytes()) for e in self._profile.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        current = 0
        for _, change in events:
            current += change
            self.peak = max(self.peak, current)


def _quant_state_bytes(state) -> int:
    if state is None:
        return 0
    total = 0
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if hasattr(value, "element_size"):
            total += value.numel() * value.element_size()
    return total + _quant_state_bytes(getattr(state, "state2", None))
