"""The estimator's constants (memory.py), each with where it comes from. "Measured" means
`benchmarks/memory_calibration.py` (allocator events of a real QLoRA step recorded by the torch
profiler on CPU) or the grids of `benchmarks/estimator_grid.py` and `benchmarks/estimator_rss.py`.
"""

from __future__ import annotations

from app.core.plan.kernel_choice import PACKED_FLASH, PACKED_LOOP, PACKED_MASKED, VARLEN_ATTENTION
from app.core.units import GIB

# NF4 storage (QLoRA paper §2): 4 bits per weight, one 8-bit absmax per block of 64 (double
# quantisation) and one fp32 second-level constant per 256 blocks: 0.5 + 1/64 + 4/16384 B/param.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# LoRA weights and their gradients stay fp32 (PEFT's autocast_adapter_dtype).
LORA_BYTES_PER_PARAM = 4
# Optimizer state per LoRA parameter: AdamW keeps two fp32 moments (8 B); bitsandbytes' 8-bit
# AdamW keeps two uint8 moments plus an fp32 absmax per 256-element block for each (2 + 8/256 B).
OPTIMIZER_BYTES_PER_PARAM = {"adamw_torch": 8.0, "paged_adamw_8bit": 2 + 8 / 256}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Activations kept for backward, bytes per token per decoder layer, as coefficients of the
# hidden size h (q/o projections included, q = h), the k/v width and the MLP width i.
# Measured (calibration grid, SDPA attention, no s^2 term: flash/efficient kernels keep only the
# log-sum-exp). LoRA dropout copies each adapted layer's input (+ a 1-byte mask), hence the two rows.
# fp32 refitted on four shapes (SmolLM2-135M/1.7B, Qwen2.5-0.5B/1.5B; bytes saved for backward
# counted with saved_tensors_hooks): with dropout the old fit stayed within -0.5..+2.6 %, without
# it was 6 % low and became (35.5, 3.4, 14.2); those four shapes have few kv heads, so the kv
# term was poorly determined, and Phi-3.5 (as many kv heads as query heads) showed it low: 8.0,
# attention keeping k and v in fp32, as in the other rows. A per-layer margin covers the spread
# between shapes and depths (up to +/-2.6 %) so that the estimate errs high.
ACTIVATION_COEFFICIENTS = {
    # (16-bit compute, dropout>0): h, kv, i ; (16-bit, no dropout); (fp32 compute ...)
    (2, True): (57.25, 4.0, 14.0),
    (2, False): (36.25, 4.0, 10.0),
    (4, True): (61.5, 8.0, 20.0),
    (4, False): (35.5, 8.0, 14.2),
}
ACTIVATION_MARGIN = 0.04
# Logits and loss: the lm_head output, its fp32 copy, log-softmax and the gradient coexist at the
# start of backward. Measured 10.4-11.0 B per token per vocabulary entry on the SmolLM2-135M and
# Qwen2.5-0.5B architectures (49k and 152k vocabularies), bf16 and fp32 compute, with and
# without checkpointing; tiny 2-layer models showed up to 16 B, where other tensors overlap.
# Refitted on the default paths (benchmarks/estimator_grid.py, fit grid): 11.5-11.8 B on those two
# architectures in fp32 beside 8 and 4 layers; the backward of log-softmax holds its output, its
# gradient and the logits' gradient, 3 fp32 tensors. 12.25 keeps the estimate on the high side.
LOGITS_BYTES = 12.25
# Soft-capped logits (Gemma 2: cap * tanh(logits / cap)) keep tanh's output for backward: one more
# logits-sized tensor in the compute dtype.
SOFTCAP_LOGITS_COPIES = 1
# Norms beyond the two per layer our coefficients were measured with each keep their input in fp32
# for backward: Gemma's post-attention and post-MLP norms (2 x hidden), and the per-head query and
# key norms of Qwen3 / Gemma 3 / OLMo 2 (query width + key width). Bytes per element.
EXTRA_NORM_BYTES = 4
# The fused loss (app/core/train/memory_savers/fused_loss.py) never holds the full logits: one chunk of fp32 logits at a
# time and the temporary of the same size torch.logsumexp makes of it (measured 2.0-2.1 chunks
# on CPU for vocabularies of 33k-152k, benchmarks/estimator_grid.py), plus per token the selected
# hidden state, the gradient it keeps for backward and that gradient scattered back: 3 hidden-size
# vectors. A chunk is `kernel_choice.chunk_rows(vocab)` rows, or all of them when there are fewer.
FUSED_LOSS_CHUNKS = 2
FUSED_LOSS_HIDDEN_COPIES = 3
# Attention that repeats each key/value head for its group of query heads keeps the repeated
# copies for backward: 2 x (query width - kv width) elements per token per layer more than
# grouped-query SDPA. Our packed paths repeat (packed_attention._repeat_kv), and so does
# transformers' SDPA whenever a padded batch has a mask (measured: +3,072 B per token per layer on
# SmolLM2-135M in fp32, exactly 2 x (576 - 192) x 4).
REPEATING_ATTENTION = {PACKED_LOOP, PACKED_MASKED, PACKED_FLASH, VARLEN_ATTENTION, "eager"}
# Eager attention (Gemma 2 without flash-attn: SDPA cannot soft-cap) keeps each head's
# sequence x sequence softmax for backward in fp32 (measured 0.9-1.0 copies, SmolLM2-135M, fp32),
# its cast to a 16-bit compute dtype for the value matmul, and tanh's output when soft-capped.
EAGER_SOFTMAX_BYTES = 4
# With checkpointing the peak is the larger of the loss phase and the recompute of one layer with
# its backward. Measured on CPU (fp32, held-out runs 3-4 of benchmarks/estimator_grid.py): 1.0-1.07x
# the layer's activations (Llama-3.2-1B, Phi-3.5, Mistral shapes); 1.1 kept. On CUDA the first
# calibration's 1.53x, not yet re-measured on a GPU: kept, as it errs high.
RECOMPUTE_FACTOR = {"cpu": 1.1, "cuda": 1.53}
# A 4-bit weight is dequantised for each matmul, forward and backward. On CPU one copy of the
# widest layer exists at a time, and never beside the loss phase (measured: the same peak with a
# 4-bit and an unquantised base on Llama-3.2-1B and Qwen3-8B shapes). On CUDA two copies are
# assumed (the dequantised weight and its cast), until the GPU grid measures it.
DEQUANTISED_COPIES = {"cpu": 1, "cuda": 2}
# Outside torch's counters on CUDA: the context and cuBLAS workspaces (0.3-0.6 GB; notes), and
# allocator slack, reserved beyond allocated (fragmentation; 8 % of the varying part, until the
# GPU calibration grid fits it).
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
ALLOCATOR_SLACK = 0.08
# On the CPU a plan predicts the process's peak resident RAM (what the memory graph draws): the
# process as it is when planned (Python, torch and the libraries, the window, the tokenised data:
# `process_baseline`, measured then) plus what training adds. glibc's heap keeps far more resident
# than torch's tensors need at once: freed blocks are reused but not given back (a sampled malloc
# in-use peak of 1.2 GiB beside 5.3 GiB resident, demo with checkpointing), so the heap grows with
# one layer's activations (tokens x per-layer bytes): the same layer-sized temporaries recur in every
# layer's forward, backward and recompute, so the heap beyond the tensors is alike with and without
# checkpointing (3.3 and 3.5 GiB at 2,944 tokens), not a share of all layers' activations (an earlier
# fit, 0.4 x varying, predicted 2.2 GiB for 4.6 with checkpointing), and it grows with the passes of
# a step (accumulation: 1.9 x with 6 at 256 and at 768 tokens) but not with the steps (the same
# after 20). Fitted on the demo (benchmarks/estimator_rss.py, results/estimator_rss-cpu.md): 9-17
# layers' worth with one pass from 128 to 2,944 tokens, 19-33 with six; one model only. (An earlier
# fixed 1.1 GiB part overestimated small steps: 0.55-0.84 of the prediction at 128-1,024 tokens.)
CPU_HEAP_FLOOR = 64 * 2**20  # the allocator's own arenas: one 128-token step of the demo went 5 MiB over without
CPU_HEAP_LAYERS = 19.0
CPU_HEAP_PER_PASS = 0.18  # more heap for each micro-batch of a step beyond the first ...
CPU_HEAP_PASSES = 6  # ... up to this many (measured to 6)
# FSDP (the weights sharded over the cards): each card keeps its share of the weights, LoRA weights,
# gradients and optimizer state, and gathers one layer's weights whole while it runs, prefetching
# the next (torch FSDP's default), and the lm_head for the loss. Not yet measured: no FSDP run yet.
FSDP_GATHERED_LAYERS = 2
