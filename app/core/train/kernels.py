"""The fast paths of a training step: attention over packed rows and a loss without full logits.

- **Packed attention.** A packed row holds several examples; each must attend only to itself.
  With flash-attn installed on CUDA, transformers' `flash_attention_2` takes the examples'
  boundaries (`cu_seq_lens_*`) and runs its varlen kernel. Otherwise one of packed_attention.py's
  functions does (torch's varlen flash kernel, one masked SDPA call, or SDPA per example), as the
  plan chose (kernel_choice.py) and the start-up self-test confirmed (selftest.py).
- **Loss.** `linear_cross_entropy` computes the lm_head and the cross-entropy only at positions
  that have a target, a chunk of rows at a time, and works out the gradient of the hidden states
  in the same pass (the lm_head is frozen in QLoRA), so the fp32 logits of the whole micro-batch
  never exist at once. Cut Cross-Entropy or Liger's fused kernel replace it on CUDA when installed
  (`pip install "tunesmith[kernels]"`).
Which models may use these is decided from config.json (`packing_support`, `fused_loss_support`):
families whose attention is plain causal self-attention and whose logits are a plain lm_head.
"""

from __future__ import annotations

import functools
import importlib.util

from app.core.models.architecture import ArchFacts

VARLEN_ATTENTION = "tunesmith_varlen"  # the per-example loop, as plans before 0.2 name it
# Families whose attention is causal self-attention with rotary positions and whose logits are
# lm_head(hidden) with no scaling or soft-capping: checked against transformers' modelling code.
PLAIN_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3"}
# Rows of logits per chunk: the fp32 chunk stays under ~128 MB for a 150k vocabulary.
CHUNK_BYTES = 128 * 2 ** 20


def packing_support(facts: ArchFacts | None, seq_len: int) -> str:
    """"" when packed rows train correctly for this model, else the reason they do not."""
    if facts is None or facts.model_type not in PLAIN_FAMILIES:
        family = facts.model_type if facts and facts.model_type else "this model's"
        return f"{family} attention is not known to keep packed examples apart"
    if facts.sliding_window and facts.sliding_window < seq_len:
        return f"its sliding attention window ({facts.sliding_window}) is shorter than the sequence"
    return ""


def fused_loss_support(facts: ArchFacts | None) -> str:
    """"" when the loss can be computed from the hidden states and a plain lm_head."""
    if facts is None or facts.model_type not in PLAIN_FAMILIES:
        family = facts.model_type if facts and facts.model_type else "this model"
        return f"{family} may scale or soft-cap its logits"
    return ""


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


def register_attention_functions() -> None:
    """Register our packed-row attention functions (packed_attention.py) with transformers, and
    the per-example loop under the name plans of earlier versions recorded."""
    from transformers import AttentionInterface

    from app.core.train import packed_attention

    packed_attention.register_packed_attention()
    current = AttentionInterface._global_mapping.get(VARLEN_ATTENTION)
    if getattr(current, "__wrapped__", current) is not packed_attention.packed_loop:  # tiled_layer wraps it
        AttentionInterface.register(VARLEN_ATTENTION, packed_attention.packed_loop)


def packed_kwargs(segments: tuple[tuple[int, int], ...], device) -> dict:
    """Forward kwargs telling the attention where each example of a packed row lies: our
    `segments`, and the cumulative lengths flash-attn's varlen kernel reads."""
    import torch

    bounds = torch.tensor([0] + [end for _, end in segments], dtype=torch.int32, device=device)
    longest = max(end - start for start, end in segments)
    return {"segments": segments, "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
            "max_length_q": longest, "max_length_k": longest}


@functools.cache
def _linear_cross_entropy_function():
    """Built on first use so that importing this module does not import torch."""
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """Sum of cross-entropy of hidden @ weight.T against targets, the gradient of the hidden
        states computed chunk by chunk in forward; `weight` is frozen (gets no gradient)."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, rows):
            grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], rows):
                h, t = hidden[start:start + rows], targets[start:start + rows]
                logits = (h @ weight.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if grad is not None:
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                    probs[torch.arange(len(t), device=t.device), t] -= 1
                    grad[start:start + rows] = probs.to(weight.dtype) @ weight
                    del probs  # else it keeps this chunk alive while the next one is computed
                del logits, lse
            if grad is not None:
                ctx.save_for_backward(grad)
            return total

        @staticmethod
        def backward(ctx, grad_total):
            (grad,) = ctx.saved_tensors
            return grad * grad_total.to(grad.dtype), None, None, None

    return LinearCrossEntropy


def chunk_rows(vocab: int) -> int:
    return max(16, CHUNK_BYTES // (4 * max(1, vocab)))


def linear_cross_entropy(hidden, weight, targets, kernel: str = "chunked"):
    """Sum over rows of cross-entropy(hidden @ weight.T, targets); hidden (N, h), targets (N,)
    with no ignored entries. `kernel` picks Cut Cross-Entropy or Liger (on CUDA, when installed;
    a run resumed where they are not falls back to ours) or ours."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    if kernel == "cce" and hidden.is_cuda and installed("cut_cross_entropy"):
        from cut_cross_entropy import linear_cross_entropy as cce

        return cce(hidden, weight, targets, reduction="sum")
    if kernel == "liger" and hidden.is_cuda and installed("liger_kernel"):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets)
    return _linear_cross_entropy_function().apply(hidden, weight, targets, chunk_rows(weight.shape[0]))
