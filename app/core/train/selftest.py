"""Before a run loads its model: try the plan's attention, loss kernel and optimizer on the device.

Each is run once on tiny tensors shaped like the model's (its head counts and sizes, its hidden
size) in the run's compute dtype: a forward and backward compared with a plain PyTorch reference,
and two optimizer steps on a small parameter. A choice that raises, gives non-finite numbers or
disagrees with the reference is replaced by the next one of its chain (kernel_choice.py), and the
replacement is tested in turn; the run never fails for a fast path that does not work here. The
whole test takes milliseconds on a GPU and on the CPU, where it runs too, with the CPU's choices.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

from app.core.config import Plan
from app.core.plan.kernel_choice import (ATTENTION_LABELS, LOSS_LABELS, OPTIMIZER_LABELS, PACKED_FLASH,
                                         attention_fallbacks, loss_fallbacks, optimizer_fallbacks)
from app.core.plan.kernel_choice import import_problem
from app.core.train.memory_savers.packed_attention import packed_kwargs, register_attention_functions, torch_flash_available

TOKENS = 64
SEGMENTS = ((0, 7), (7, 40), (40, 64))  # three packed examples of uneven lengths
LOSS_ROWS, LOSS_VOCAB = 48, 512
OPTIMIZER_PARAMS = 1 << 16  # above bitsandbytes' 4,096-element threshold for 8-bit state
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 2e-2}


@dataclass
class SelfTestResult:
    """The plan to train with, a line per check, and (what changed, why) per fallback."""

    plan: Plan
    lines: list[str] = field(default_factory=list)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    liger_works: bool = False  # Liger's kernels ran right here (then its RMSNorm/SwiGLU/RoPE are used)


@dataclass(frozen=True)
class Shapes:
    """The model's attention and hidden sizes that the kernels see."""

    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    softcap: bool = False  # attention scores soft-capped (the fallbacks skip SDPA)


def run_selftest(plan: Plan, shapes: Shapes, capability: tuple[int, int] | None = None) -> SelfTestResult:
    """Test the plan's kernels on `plan.device`; return the plan with any that failed replaced."""
    result = SelfTestResult(plan)
    packed = plan.batching == "packed"
    attention = plan.attention or "sdpa"
    choices = [attention, *attention_fallbacks(attention, packed, plan.device, capability, shapes.softcap)]
    chosen = _first_working(result, "attention", choices, ATTENTION_LABELS,
                            lambda name: check_attention(name, packed, shapes, plan.compute_dtype, plan.device))
    loss = _first_working(result, "loss", [plan.loss, *loss_fallbacks(plan.loss, plan.device)], LOSS_LABELS,
                          lambda name: check_loss(name, shapes.hidden, plan.compute_dtype, plan.device))
    optimizer = _first_working(result, "optimizer", [plan.optimizer, *optimizer_fallbacks(plan.optimizer)],
                               OPTIMIZER_LABELS, lambda name: check_optimizer(name, plan.device))
    result.liger_works = loss == "liger" or _liger_works(result, shapes, plan)
    if (chosen, loss, optimizer) != (attention, plan.loss, plan.optimizer):
        reasons = dict(plan.reasons)
        for key, old, new, labels in (("attention", attention, chosen, ATTENTION_LABELS),
                                      ("loss", plan.loss, loss, LOSS_LABELS),
                                      ("optimizer", plan.optimizer, optimizer, OPTIMIZER_LABELS)):
            if old != new:
                reasons[key] = f"{labels.get(new, new)}: {labels.get(old, old)} failed the start-up self-test"
        result.plan = replace(plan, attention=chosen if plan.attention else plan.attention, loss=loss,
                              optimizer=optimizer, reasons=reasons)
    return result


def check_attention(name: str, packed: bool, shapes: Shapes, dtype: str, device: str) -> str:
    """"" when attention `name` matches causal SDPA per example, else what went wrong."""
    import torch

    if name == "eager":
        return ""  # transformers' own matmul-softmax-matmul: nothing to go wrong
    if name == PACKED_FLASH:  # it hands unsupported inputs to the masked call: say so here instead

        if not torch_flash_available():
            return "this torch has no FlashAttention varlen kernel"
    register_attention_functions()
    from transformers import AttentionInterface

    function = AttentionInterface._global_mapping[name]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, TOKENS, shapes.head_dim, generator=generator)
               for heads in (shapes.heads, shapes.kv_heads, shapes.kv_heads))
    segments = SEGMENTS if packed else ((0, TOKENS),)
    expected_out, expected_grad = _reference_attention(q, k, v, segments)
    compute = getattr(torch, dtype)
    q, k, v = (t.to(device=device, dtype=compute).requires_grad_() for t in (q, k, v))
    kwargs = packed_kwargs(segments, q.device) if packed else {}
    out, _ = function(_AttentionProbe(name, shapes), q, k, v, None, dropout=0.0,
                      scaling=shapes.head_dim ** -0.5, **kwargs)
    out.float().sum().backward()
    return _compare(out.float().cpu(), expected_out, dtype) or _compare(q.grad.float().cpu(), expected_grad, dtype)


def check_loss(kernel: str, hidden: int, dtype: str, device: str) -> str:
    """"" when loss `kernel` gives the reference cross-entropy and gradient, else why not."""
    import torch
    import torch.nn.functional as F

    from app.core.train.memory_savers.fused_loss import linear_cross_entropy  # at call time: tests replace linear_cross_entropy there

    if kernel == "plain":
        return ""
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(LOSS_ROWS, hidden, generator=generator)
    w = torch.randn(LOSS_VOCAB, hidden, generator=generator) / hidden ** 0.5
    targets = torch.randint(0, LOSS_VOCAB, (LOSS_ROWS,), generator=generator)
    compute = getattr(torch, dtype)
    h16, w16 = h.to(compute), w.to(compute)  # the reference sees the same rounded inputs
    reference_h = h16.float().requires_grad_()
    expected = F.cross_entropy(reference_h @ w16.float().t(), targets, reduction="sum")
    expected.backward()
    h_dev = h16.to(device).requires_grad_()
    got = linear_cross_entropy(h_dev, w16.to(device), targets.to(device), kernel)
    got.backward()
    return (_compare(got.detach().float().cpu().reshape(1), expected.detach().reshape(1), dtype)
            or _compare(h_dev.grad.float().cpu(), reference_h.grad, dtype))


def check_optimizer(name: str, device: str) -> str:
    """"" when two steps of optimizer `name` move a parameter and keep it finite."""
    import torch

    from app.core.train.optimizer import make_optimizer  # at call time: tests replace make_optimizer there

    param = torch.nn.Parameter(torch.zeros(OPTIMIZER_PARAMS, device=device))
    optimizer = make_optimizer(name, [param], lr=1e-3, weight_decay=0.0)
    for _ in range(2):
        param.grad = torch.ones_like(param)
        optimizer.step()
    values = param.detach().float().cpu()
    del optimizer, param
    if not torch.isfinite(values).all():
        return "non-finite weights after two steps"
    if not (values < 0).all():
        return "the weights did not move against the gradient"
    return ""


# -- helpers ----------------------------------------------------------------------------------
def _liger_works(result: SelfTestResult, shapes: Shapes, plan: Plan) -> bool:
    """Whether Liger's Triton kernels run on this card (tried through its fused loss), when it is
    installed on CUDA; the answer decides whether its model kernels are applied."""
    if plan.device != "cuda" or import_problem("liger_kernel"):
        return False
    try:
        problem = check_loss("liger", shapes.hidden, plan.compute_dtype, plan.device)
    except Exception as err:  # noqa: BLE001 - a failure here only keeps Liger's kernels out
        problem = f"{type(err).__name__}: {str(err)[:160]}"
    result.lines.append(f"self-test: Liger kernels {'ok' if not problem else 'failed: ' + problem}")
    return not problem


def _first_working(result: SelfTestResult, what: str, choices: list[str], labels: dict[str, str],
                   check: Callable[[str], str]) -> str:
    failures = []
    for name in dict.fromkeys(choices):
        started = time.perf_counter()
        try:
            problem = check(name)
        except Exception as err:  # noqa: BLE001 - a failing fast path is exactly what this looks for
            text = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
            problem = f"{type(err).__name__}{': ' + text if text else ''}"
        label = labels.get(name, name)
        if not problem:
            result.lines.append(f"self-test: {what} {label} ok ({(time.perf_counter() - started) * 1000:.0f} ms)")
            if failures:
                result.fallbacks.append((what, f"Start-up self-test: {'; '.join(failures)}; using {label}"))
            return name
        failures.append(f"{what} {label} failed ({problem})")
        result.lines.append(f"self-test: {what} {label} failed: {problem}")
    raise RuntimeError(f"no {what} path works on this machine: {'; '.join(failures)}")


def _reference_attention(q, k, v, segments):
    """Causal attention per example in fp32 on the CPU: output (1, tokens, heads, dim), dq."""
    import torch
    import torch.nn.functional as F

    q = q.clone().requires_grad_()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    parts = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True)
             for s, e in segments]
    out = torch.cat(parts, dim=2).transpose(1, 2)
    out.sum().backward()
    return out.detach(), q.grad


def _compare(got, expected, dtype: str) -> str:
    import torch

    if got.shape != expected.shape:
        return f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    if not torch.isfinite(got).all():
        return "non-finite values"
    scale = expected.abs().max().clamp_min(1e-6)
    error = float((got - expected).abs().max() / scale)
    if error > TOLERANCE.get(dtype, 5e-2):
        return f"differs from the reference by {error:.1%} of its largest value"
    return ""


class _AttentionProbe:
    """The attributes of an attention layer that transformers' attention functions read."""

    def __init__(self, name: str, shapes: Shapes):
        self.is_causal = True
        self.training = False
        self.layer_idx = 0
        self.num_key_value_groups = shapes.heads // shapes.kv_heads
        self.config = type("ProbeConfig", (), {"_attn_implementation": name})()

    def modules(self):
        return iter(())
