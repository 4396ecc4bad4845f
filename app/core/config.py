"""Typed training configuration with one source of truth for defaults and help texts.

`TrainConfig` is what the user asks for (CLI flags, GUI fields); a field left at `None` is chosen
by the planner. `Plan` is what a run actually uses, with a one-line reason per choice. Both are
dataclasses whose field `help` metadata is what `--help` and GUI tooltips show, and both round-trip
through JSON into the run folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


QUANTIZE_CHOICES = ("auto", "4bit", "none")  # TrainConfig.quantize: the planner's and the flag's
METHOD_CHOICES = ("sft", "dpo", "orpo")  # TrainConfig.method
PREFERENCE_METHODS = ("dpo", "orpo")  # the methods that train on preference pairs


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


class JsonRoundTrip:
    """to_dict/from_dict for a dataclass; unknown keys (from a newer version) are ignored."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainConfig(JsonRoundTrip):
    """What the user asked for. `None` means: let the planner choose."""

    model: str = _f("demo", "Model: a local folder, a Hugging Face cache entry or hub id, or 'demo'.")
    data: str = _f("", "Training data: JSONL, JSON array or parquet file.")
    val_data: str = _f("", "Eval examples in a file of their own, in the same format (instead of holding out "
                           "training examples).")
    val_split: float | None = _f(None, "Percent of the training examples held out to judge the run (0-50; 0: "
                                       "none). Default: 5 %, at least 8 and at most 200, none below 40 examples; "
                                       "a prompt and its repeats are held out together.")
    name: str = _f("", "Run name shown in the run list (default: model and data names).")
    method: str = _f("sft", "What the run learns: sft (the answers in the data), dpo (to prefer each pair's chosen "
                            "answer over its rejected one, measured against the model before training: Direct "
                            "Preference Optimisation), or orpo (the chosen answers and the preference together, no "
                            "reference: Odds Ratio Preference Optimisation). dpo and orpo train on preference pairs "
                            "(prompt, chosen, rejected).")
    beta: float = _f(0.1, "dpo/orpo: how strongly the preference counts (DPO: how far the tuned model may move from "
                          "the reference; ORPO: the odds-ratio term's weight beside the answers' loss).")
    start_from: str = _f("", "dpo/orpo: start from this finished run's adapter (an SFT run, usually); for dpo it is "
                             "also the reference the preference is measured against.")
    preset: str = _f("auto", "Memory budget: 'auto' (this machine's free memory) or a VRAM preset "
                             "such as 8gb, 12gb, 16gb, 24gb, 48gb, 80gb, or one of yours.")
    rank: int | None = _f(None, "LoRA rank r: adapter capacity. Default 16.")
    lora_alpha: int | None = _f(None, "LoRA scaling alpha. Default 2 x rank.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input during training.")
    seq_len: int | None = _f(None, "Longest example in tokens; longer ones are truncated (and counted). A preference "
                                   "pair counts both its answers with their prompt (they train in one pass).")
    epochs: float = _f(1.0, "Passes over the training data.")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides epochs).")
    micro_batch: int | None = _f(None, "Examples per forward pass (packed: rows of this many x seq_len tokens).")
    grad_accum: int | None = _f(None, "Micro-batches per optimizer step.")
    lr: float = _f(2e-4, "Peak learning rate (cosine schedule after 3% warmup).")
    warmup_ratio: float = _f(0.03, "Fraction of steps spent warming the learning rate up.")
    max_grad_norm: float = _f(0.3, "Gradients are clipped to this norm.")
    weight_decay: float = _f(0.0, "AdamW weight decay on the LoRA weights.")
    grad_checkpointing: bool | None = _f(None, "Recompute activations to save memory (~20-30% slower).")
    mlp_tile: int = _f(0, "Run each layer's MLP over tiles of this many tokens: the same result, less "
                          "memory at long lengths, one more MLP forward in backward. 0: off.")
    offload_checkpoints: bool = _f(False, "Keep each checkpointed layer's input in CPU RAM instead of on the "
                                          "GPU (turns checkpointing on; no effect on the CPU).")
    layer_tile: int = _f(0, "Recompute each checkpointed layer over tiles of this many tokens, all but attention "
                            "itself: the same result, far less memory at long lengths, ~10% slower. Turns "
                            "checkpointing on. 0: off.")
    packing: bool | None = _f(None, "Pack several examples into each padding-free micro-batch. "
                                    "Default: on where the model's attention supports it.")
    quantize: str = _f("auto", "Base weights: auto (unquantised when that fits with room to spare: faster, no "
                               "dequantising at every matmul; else 4-bit), 4bit (QLoRA), or none.")
    attention: str = _f("auto", "Attention kernel: auto (the fastest the card and installed packages "
                                "run), flash (flash-attn), sdpa (PyTorch's own), varlen (SDPA per "
                                "packed example).")
    loss_kernel: str = _f("auto", "Fused loss: auto, cce (Cut Cross-Entropy), liger, or chunked (ours).")
    gpu: str = _f("", "Plan for this NVIDIA card (e.g. \"RTX 3060\") instead of the one in this machine; "
                      "on train it caps the memory to that card's.")
    gpus: int = _f(1, "Train on this many GPUs of this machine, one process each (DDP: each a replica of the "
                      "adapter, the micro-batches of a step shared out). On a machine without a GPU, that many "
                      "CPU processes (gloo), the same code.")
    nodes: int = _f(1, "Machines training together (a rented cluster): start the same command on each, with "
                       "its own --node-rank and the first machine's --master-addr; --gpus is per machine.")
    node_rank: int = _f(0, "This machine's place among --nodes: 0 on the first (which keeps the run), 1, 2, ...")
    master_addr: str = _f("", "With --nodes: the address of the machine with --node-rank 0, reachable from the "
                              "others.")
    master_port: int = _f(29500, "With --nodes: a free TCP port on the machine with --node-rank 0.")
    strategy: str = _f("auto", "With --gpus: auto (each card a replica, DDP, when the 4-bit model and its step fit "
                               "one; else FSDP-QLoRA), ddp, or fsdp (the 4-bit weights, LoRA and optimizer state "
                               "sharded over the cards).")
    threads: int | None = _f(None, "CPU threads torch computes with (CPU runs). Default: the cores other "
                                   "programs leave free, measured as the run is planned.")
    eval_every: int | None = _f(None, "Evaluate every N steps when there is eval data (default: 8 evals a run), and "
                                      "at least every 15 minutes.")
    early_stop: str = _f("warn", "When the eval loss rises while the training loss falls (overfitting): warn (say so "
                                 "and go on), stop (end the run; its adapter is then the best eval's), or off. "
                                 "After an alarm the run's adapter is the best eval's, the last step's in "
                                 "last-adapter/.")
    patience: int = _f(2, "Evals in a row above the best eval loss before the overfitting alarm.")
    report: str = _f("loss,answers,probes", "The before/after report written when a run finishes or stops "
                                            "(report.md in its folder), base and tuned side by side; any of: loss "
                                            "(each held-out example's), answers (8 held-out prompts, greedy), probes "
                                            "(50 general questions: has it forgotten?); or off.")
    probes: str = _f("", "A probe file of yours (JSONL: prompt, answer, match), scored in the report beside the "
                         "built-in general questions.")
    save_every: int | None = _f(None, "Save a checkpoint every N steps (and always on stop).")
    seed: int = _f(42, "Seed for data order, split and LoRA initialisation.")
    skip_bad: bool = _f(False, "Train on the good rows and skip unusable ones (they are counted).")
    trust_remote_code: bool = _f(False, "Allow the model's own Python code to run. Only for models you trust.")
    allow_pickle: bool = _f(False, "Allow pickle (.bin/.pt) weights, which can run code when loaded.")


@dataclass
class Plan(JsonRoundTrip):
    """The settings a run trains with, each chosen by the user or the planner, with reasons."""

    rank: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    seq_len: int = _f(1024, "Sequence length in tokens.")
    micro_batch: int = _f(1, "Examples per forward pass.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    grad_checkpointing: bool = _f(False, "Gradient checkpointing on or off.")
    mlp_tile: int = _f(0, "Tokens per MLP tile (train/memory_savers/tiled_mlp.py); 0: the MLP runs over the whole sequence.")
    offload_checkpoints: bool = _f(False, "Checkpointed layers' inputs kept in host RAM (train/memory_savers/offload.py).")
    layer_tile: int = _f(0, "Tokens per tile of the checkpointed layers (train/memory_savers/tiled_layer.py); 0: untiled.")
    batching: str = _f("grouped", "packed: examples packed into padding-free rows of micro_batch x "
                                  "seq_len tokens; grouped: padded batches of similar lengths; "
                                  "random: padded batches in plain shuffled order.")
    loss: str = _f("plain", "How the loss is computed: plain (full fp32 logits) or fused without "
                            "full logits: chunked (ours), cce (Cut Cross-Entropy), liger.")
    attention: str = _f("", "Attention implementation (see kernel_choice.py); empty in plans of older "
                            "versions: chosen from the batching.")
    total_steps: int = _f(0, "Optimizer steps the run will take.")
    steps_per_epoch: int = _f(0, "Optimizer steps in one pass over the data.")
    warmup_steps: int = _f(0, "Steps of linear learning-rate warmup.")
    eval_every: int = _f(0, "Evaluate every N steps (0: no validation data).")
    save_every: int = _f(0, "Checkpoint every N steps.")
    quantize: str = _f("4bit", "The base model's weights: 4bit (NF4 + double quantisation, QLoRA) or none "
                              "(16-bit on CUDA, fp32 on CPU: LoRA without dequantising every matmul).")
    compute_dtype: str = _f("float32", "Dtype of the 4-bit layers' compute.")
    optimizer: str = _f("adamw_torch", "Optimizer implementation.")
    device: str = _f("cpu", "Where training runs.")
    threads: int = _f(0, "CPU threads torch computes with (each process's); 0 on a GPU.")
    gpus: int = _f(1, "Processes training together (one per GPU; gloo processes on the CPU); each step's "
                      "micro-batches are shared out, grad_accum is per process.")
    nodes: int = _f(1, "Machines the processes are on (gpus on each); rank 0 on the first keeps the run.")
    strategy: str = _f("", "With several GPUs: ddp (each card a replica), fsdp (the weights sharded over the "
                           "cards), fsdp-offload (the shards in host RAM); empty for one process.")
    gpu: str = _f("", "The card the plan was made for (detected or named), empty on the CPU.")
    gpu_capability: str = _f("", "That card's CUDA compute capability, e.g. 8.9.")
    preset: str = _f("", "The memory preset the plan was made for.")
    budget_bytes: int = _f(0, "Memory the plan may use: the budget less the safety margin.")
    predicted_peak_bytes: int = _f(0, "The estimator's predicted peak memory of a training step.")
    estimated_s: float = _f(0.0, "How long the run should take (its tokens at the speed a run of this model trained "
                                 "this way measured here); 0: not yet measured.")
    breakdown: dict = field(default_factory=dict, metadata={"help": "Predicted bytes by component."})
    reasons: dict = field(default_factory=dict, metadata={"help": "Why each value was chosen."})


def field_help(cls: type, name: str) -> str:
    """The help text of a config field, for tooltips and `--help`."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)
