"""The loss a supervised fine-tuning step minimises: next-token cross-entropy summed over the
targets of a batch (the caller divides by the step's target count), plain or fused."""

from __future__ import annotations

from app.core.data.packing import Batch
from app.core.data.tokenize import IGNORE
from app.core.train.memory_savers.fused_loss import linear_cross_entropy
from app.core.train.memory_savers.packed_attention import packed_kwargs


def model_inputs(batch: Batch, device) -> dict:
    """The forward's keyword arguments for `batch` (packed rows get their segments' attention)."""
    inputs = {"input_ids": batch.input_ids.to(device)}
    if batch.attention_mask is not None:
        inputs["attention_mask"] = batch.attention_mask.to(device)
    if batch.position_ids is not None:
        inputs["position_ids"] = batch.position_ids.to(device)
    if batch.packed:
        inputs |= packed_kwargs(batch.segments, device)
    return inputs


def loss_sum(model, batch: Batch, device, loss: str = "plain"):
    """Summed next-token cross-entropy of `batch` under `model` (a PEFT causal LM).

    plain: the model's logits at every position, in fp32. Fused ("chunked", "cce", "liger"): the
    decoder's hidden states at the positions with a target only, through the lm_head and the loss
    together (kernels.linear_cross_entropy)."""
    import torch.nn.functional as F

    inputs = model_inputs(batch, device)
    targets = batch.targets.to(device)
    if loss == "plain":
        logits = model(**inputs).logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
    causal_lm = model.get_base_model()
    hidden = causal_lm.get_decoder()(**inputs).last_hidden_state
    keep = targets != IGNORE
    return linear_cross_entropy(hidden[keep], causal_lm.get_output_embeddings().weight, targets[keep], loss)
