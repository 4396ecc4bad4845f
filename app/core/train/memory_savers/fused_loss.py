"""The loss without full logits: `linear_cross_entropy` computes the lm_head and the
cross-entropy only at positions that have a target, a chunk of rows at a time (kernel_choice.chunk_rows),
and works out the gradient of the hidden states in the same pass (the lm_head is frozen in QLoRA),
so the fp32 logits of the whole micro-batch never exist at once. Cut Cross-Entropy or Liger's
fused kernel replace it on CUDA when installed (`pip install "tunesmith[kernels]"`). Which models
may use it: models/support.py `fused_loss_support`."""

from __future__ import annotations

import functools

from app.core.plan.kernel_choice import chunk_rows
from app.core.train.kernels import installed


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
