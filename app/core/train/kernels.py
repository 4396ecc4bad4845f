"""The fast paths a model is loaded with: the attention implementation its plan names (our packed
attention functions registered with transformers: memory_savers/packed_attention.py) and Liger's
kernels on CUDA; `installed` asks whether an optional kernel package imports here. The loss without
full logits is memory_savers/fused_loss.py; which models may use these, models/support.py."""

from __future__ import annotations

import importlib.util

from app.core.plan.kernel_choice import VARLEN_ATTENTION
from app.core.train.memory_savers.packed_attention import register_attention_functions


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def attention_for(plan_attention: str, packed: bool, device: str) -> str:
    """The attention implementation a model is loaded with: the plan's, registered with
    transformers; plans written before the plan named it get what that version used."""
    register_attention_functions()
    if plan_attention:
        return plan_attention
    if not packed:
        return "sdpa"
    if device == "cuda" and installed("flash_attn"):
        return "flash_attention_2"
    return VARLEN_ATTENTION


def apply_liger_kernels(model, device: str, proven: bool) -> str:
    """Swap in Liger's RMSNorm, SwiGLU and RoPE kernels on CUDA when liger-kernel is installed and
    `proven` (its fused loss passed the start-up self-test on this card, so its Triton kernels run
    here), before LoRA wraps the model; the linear layers are left alone. Returns what was done."""
    if device != "cuda" or not installed("liger_kernel"):
        return ""
    if not proven:
        return "Liger kernels not applied: Liger failed the start-up self-test on this card"
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    except Exception as err:  # noqa: BLE001 - an optional speed-up must never stop a run
        return f"Liger kernels not applied ({type(err).__name__}: {str(err)[:120]})"
    return "Liger kernels: RMSNorm, SwiGLU, RoPE"
