"""Which attention, loss kernel and optimizer a run uses, chosen from the card and what imports.

Each choice is the first of a chain that is eligible: the card can run it (FlashAttention-2
needs compute capability 8.0+) and its package imports here (an import that fails is a reason,
not a crash). The planner writes the choice and its reason into the plan; before training,
`selftest.py` tries the choice on the device and moves down the same chain when it fails:

- attention, packed rows: flash-attn's varlen kernel -> torch's own varlen flash attention
  (one call per layer) -> one SDPA call with a block-diagonal mask -> SDPA per example (a loop);
- attention, padded batches: flash-attn -> PyTorch SDPA -> eager;
- loss: Cut Cross-Entropy -> Liger -> ours, chunked (fused ones only for plain-logit models) ->
  full logits;
- optimizer: bitsandbytes' paged 8-bit AdamW (CUDA) -> torch AdamW.
The user may start a chain elsewhere (`--attention`, `--loss-kernel`); a choice the card or this
machine cannot run is refused with the reason.
"""

from __future__ import annotations

import importlib
import re
import importlib.util
from functools import cache

from app.core.errors import ConfigError

FLASH = "flash_attention_2"
PACKED_FLASH = "tunesmith_packed_flash"   # torch.nn.attention.varlen (FlashAttention inside torch)
PACKED_MASKED = "tunesmith_packed_masked"  # one SDPA call, block-diagonal causal mask
PACKED_LOOP = "tunesmith_packed_loop"      # SDPA per example
ATTENTION_LABELS = {
    FLASH: "FlashAttention-2 (flash-attn)",
    PACKED_FLASH: "torch varlen flash attention",
    PACKED_MASKED: "SDPA with a block-diagonal mask",
    PACKED_LOOP: "SDPA per example",
    "sdpa": "PyTorch SDPA",
    "eager": "eager attention",
}
VARLEN_ATTENTION = "tunesmith_varlen"  # the per-example loop, as plans before 0.2 name it
# Rows of logits per chunk of the fused loss: the fp32 chunk stays under ~128 MB for a 150k vocabulary.
CHUNK_BYTES = 128 * 2 ** 20
SHORT_LABELS = {FLASH: "flash-attn", PACKED_FLASH: "torch varlen"}
ATTENTION_CHOICES = ("auto", "flash", "sdpa", "varlen")
LOSS_CHOICES = ("auto", "cce", "liger", "chunked")
LOSS_LABELS = {"cce": "Cut Cross-Entropy", "liger": "Liger fused linear+CE", "chunked": "ours, chunked",
               "plain": "full logits"}
OPTIMIZER_LABELS = {"paged_adamw_8bit": "paged 8-bit AdamW (bitsandbytes)", "adamw_torch": "AdamW (torch)"}
FLASH_CAPABILITY = (8, 0)


@cache
def import_problem(module: str) -> str:
    """"" when `module` imports here, else why not (one line). Importing, not just finding the
    package, catches a flash-attn built for another torch or CUDA (undefined symbols)."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any failure to import is a reason to skip the package
        text = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        return f"{module} does not import ({type(err).__name__}{': ' + text if text else ''})"
    return ""


def attention_chain(packed: bool, device: str, capability: tuple[int, int] | None,
                    softcap: bool = False) -> list[tuple[str, str]]:
    """Every attention implementation for this batching and device, best first, each with ""
    when it can run here or the reason it cannot. `softcap`: the model soft-caps its attention
    scores (Gemma 2), which transformers' SDPA path refuses; flash-attn and eager can."""
    on_cuda = device == "cuda"
    card_ok = capability is not None and tuple(capability) >= FLASH_CAPABILITY
    card_why = ("" if card_ok else f"needs compute capability 8.0+ (this card: "
                f"{'.'.join(map(str, capability)) if capability else 'unknown'})")
    flash_why = ("needs a CUDA GPU" if not on_cuda else card_why or
                 (import_problem("flash_attn") and "not installed (pip install flash-attn)"))
    if not packed:
        sdpa_why = "the model soft-caps its attention scores, which SDPA cannot" if softcap else ""
        return [(FLASH, flash_why), ("sdpa", sdpa_why), ("eager", "")]
    torch_flash_why = "needs a CUDA GPU" if not on_cuda else card_why or _torch_varlen_problem()
    chain = [(FLASH, flash_why), (PACKED_FLASH, torch_flash_why)]
    # On the CPU the per-example loop is the faster of the two SDPA paths (benchmarks/results/
    # packed_attention-cpu.md); on CUDA one masked call beats hundreds of small launches.
    sdpa_paths = [PACKED_MASKED, PACKED_LOOP] if on_cuda else [PACKED_LOOP, PACKED_MASKED]
    return chain + [(name, "") for name in sdpa_paths]


def choose_attention(packed: bool, device: str, capability: tuple[int, int] | None,
                     wanted: str = "auto", softcap: bool = False) -> tuple[str, str]:
    """(implementation, reason) for `wanted` (one of ATTENTION_CHOICES)."""
    chain = attention_chain(packed, device, capability, softcap)
    if wanted == "auto":
        name, _ = next((name, why) for name, why in chain if not why)
        skipped = [f"{SHORT_LABELS.get(n, n)}: {why}" for n, why in chain[:[n for n, _ in chain].index(name)]
                   if why != "needs a CUDA GPU"]
        reason = f"{ATTENTION_LABELS[name]}" + (f" ({'; '.join(skipped)})" if skipped else "")
        return name, reason
    names = {"flash": [FLASH], "varlen": [PACKED_LOOP],
             "sdpa": [PACKED_FLASH, PACKED_MASKED] if packed else ["sdpa"]}.get(wanted)
    if names is None:
        raise ConfigError(f"--attention {wanted}: choose one of {', '.join(ATTENTION_CHOICES)}")
    if wanted == "varlen" and not packed:
        raise ConfigError("--attention varlen works on packed rows only; use --packing or --attention sdpa")
    reasons = dict(chain)
    for name in names:
        if not reasons.get(name, "no such path"):
            return name, f"{ATTENTION_LABELS[name]}: set by you (--attention {wanted})"
    why = reasons.get(names[0], "")
    raise ConfigError(f"--attention {wanted} cannot run here: {why}; use --attention auto")


def attention_fallbacks(current: str, packed: bool, device: str,
                        capability: tuple[int, int] | None, softcap: bool = False) -> list[str]:
    """The implementations after `current` in its chain that can run here, in order."""
    chain = attention_chain(packed, device, capability, softcap)
    names = [name for name, _ in chain]
    start = names.index(current) + 1 if current in names else 0
    return [name for name, why in chain[start:] if not why]


def loss_chain(device: str) -> list[tuple[str, str]]:
    """Fused loss kernels, best first, with "" or why each cannot run here."""
    cuda_why = "" if device == "cuda" else "needs a CUDA GPU"
    return [("cce", cuda_why or (import_problem("cut_cross_entropy") and
                                 'Cut Cross-Entropy is not installed (pip install "tunesmith[kernels]")')),
            ("liger", cuda_why or (import_problem("liger_kernel") and
                                   'Liger is not installed (pip install "tunesmith[kernels]")')),
            ("chunked", "")]


def choose_loss(device: str, fused_why_not: str, wanted: str = "auto") -> tuple[str, str]:
    """(loss kernel, reason). `fused_why_not`: why this model cannot use a fused loss, or ""."""
    if wanted not in LOSS_CHOICES:
        raise ConfigError(f"--loss-kernel {wanted}: choose one of {', '.join(LOSS_CHOICES)}")
    if fused_why_not:
        if wanted != "auto":
            raise ConfigError(f"--loss-kernel {wanted} is not available for this model: {fused_why_not}; "
                              "leave it on auto")
        return "plain", f"full logits: {fused_why_not}"
    chain = loss_chain(device)
    what = "lm_head and loss only where there is a target, no full fp32 logits"
    if wanted == "auto":
        name = next(name for name, why in chain if not why)
        return name, f"fused ({LOSS_LABELS[name]}): {what}"
    why = dict(chain)[wanted]
    if why:
        raise ConfigError(f"--loss-kernel {wanted} cannot run here: {why}; use --loss-kernel auto")
    return wanted, f"fused ({LOSS_LABELS[wanted]}): set by you"


def loss_fallbacks(current: str, device: str) -> list[str]:
    """The loss kernels after `current` that can run here; full logits ("plain", more memory but
    no kernel of ours) last."""
    if current == "plain":
        return []
    chain = loss_chain(device)
    names = [name for name, _ in chain]
    start = names.index(current) + 1 if current in names else 0
    return [name for name, why in chain[start:] if not why] + ["plain"]


def optimizer_fallbacks(current: str) -> list[str]:
    return ["adamw_torch"] if current != "adamw_torch" else []


def _torch_varlen_problem() -> str:
    """"" when the installed torch has `torch.nn.attention.varlen` (2.9+); read from the package
    metadata so that planning for a card on a machine without one does not import torch."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = tuple(int(part) for part in re.findall(r"\d+", version("torch"))[:2])
    except (PackageNotFoundError, ValueError):
        return "torch is not installed"
    return "" if release >= (2, 9) else f"torch {'.'.join(map(str, release))} has no varlen attention (2.9+)"


def chunk_rows(vocab: int) -> int:
    """Rows of the fused loss's chunks (memory_savers/fused_loss.py), for the estimator too."""
    return max(16, CHUNK_BYTES // (4 * max(1, vocab)))
