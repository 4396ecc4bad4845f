"""The QLoRA model in training: 4-bit base + LoRA, optimizer, schedule, one step, eval, checkpoints.

Recipe: NF4 with double quantisation, bf16 compute on CUDA cards that have it (fp16 with a
gradient scaler on Volta and Turing, fp32 on CPU), LoRA on every linear layer of the blocks with
its weights in fp32, paged 8-bit AdamW on CUDA (torch AdamW on CPU), cosine schedule with warmup,
gradients clipped to `max_grad_norm`. Before the model loads, the start-up self-test
(selftest.py) tries the plan's attention, loss kernel and optimizer and replaces any that fail.
The loss is the mean over all trained tokens of an optimizer step, however they fall across
micro-batches. Micro-batches are packed rows or padded batches (`Plan.batching`); the loss is
fused or plain (`Plan.loss`, see memory_savers/fused_loss.py). In a run on several processes each trains its share
of a step's micro-batches (distributed.py), as a replica or, under FSDP, sharded (sharded.py).
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

from app.core.atomic import staged_dir, write_json, write_manifest
from app.core.config import PREFERENCE_METHODS
from app.core.data.packing import Batch, collate_packed, collate_padded
from app.core.data.tokenize import Tokenized
from app.core.errors import RunError
from app.core.host import process_peak_ram, process_ram
from app.core.models.load import load_base_model
from app.core.models.support import fused_loss_support
from app.core.train.kernels import apply_liger_kernels, attention_for
from app.core.train.loss import loss_sum
from app.core.train.memory_savers.offload import offload_checkpoints
from app.core.train.memory_savers.packed_attention import clear_mask_cache
from app.core.train.memory_savers.tiled_layer import NotTileable, tile_layers
from app.core.train.memory_savers.tiled_mlp import tile_mlps
from app.core.train.optimizer import make_optimizer
from app.core.train.parallel import sharded
from app.core.train.parallel.sharded import full_tensor, gathered_lora, gradient_scale, shard
from app.core.train.preference import REFERENCE_FILE, PreferenceObjective, ReferenceLogps, compute_reference
from app.core.train.prepare import Prepared
from app.core.train.selftest import SelfTestResult, Shapes, run_selftest

ADAPTER_NOTE = "tunesmith.json"  # beside an adapter kept mid-run: its step and eval loss


class QLoraSession:
    """Owns the model and optimizer of one run for as long as it trains."""

    def __init__(self, prepared: Prepared, ranks=None):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import get_cosine_schedule_with_warmup

        config = prepared.config
        self.config, self.ranks = config, ranks  # ranks: this worker's place in a run on several (distributed.py)
        self.on_pass = None  # called as each micro-batch of a step starts: (index, passes, tokens before it)
        self.device = torch.device(prepared.plan.device)
        self.threads_before = torch.get_num_threads()  # given back on release (the window chats after)
        if prepared.plan.device == "cpu" and getattr(prepared.plan, "threads", 0):
            torch.set_num_threads(prepared.plan.threads)  # the free cores (planner.cpu_threads)
        self.pad_id = prepared.tokenizer.pad_token_id
        checked = self_test(prepared.plan, prepared.model.arch, self.device)
        self.plan = plan = checked.plan
        self.selftest_lines, self.fallbacks = checked.lines, checked.fallbacks
        liger_works = checked.liger_works
        torch.manual_seed(config.seed)
        self.attention = attention_for(plan.attention, plan.batching == "packed", plan.device)
        self.sharded = bool(ranks) and plan.strategy.startswith("fsdp")  # FSDP-QLoRA: sharded.py
        base = load_base_model(prepared.model, getattr(torch, plan.compute_dtype), plan.device,
                               config.trust_remote_code, self.attention, plan.quantize,
                               plan.compute_dtype if self.sharded else "uint8")
        base.config.use_cache = False
        self.notes = [note for note in [f"base: {'NF4' if plan.quantize == '4bit' else plan.compute_dtype}, "
                                        f"attention: {self.attention}, loss: {plan.loss}, "
                                        f"compute: {plan.compute_dtype}, optimizer: {plan.optimizer}",
                                        apply_liger_kernels(base, plan.device, liger_works)] if note]
        freeze_for_lora(base, plan.grad_checkpointing)
        lora = LoraConfig(r=plan.rank, lora_alpha=plan.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        self.model = get_peft_model(base, lora)
        if prepared.start_adapter:  # --from: the run starts where that run's adapter ended
            self.notes.append(start_from_adapter(self.model, prepared.start_adapter, self.device))
        self.preference = PreferenceObjective(config.method, config.beta,
                                              answers_only=not fused_loss_support(prepared.model.arch)) \
            if config.method in PREFERENCE_METHODS else None
        self.eval_preference: dict = {}  # a preference run's measures of the last evaluate
        self.notes += self._save_memory(plan)
        for param in self.model.parameters():  # fp32 LoRA weights whatever the compute dtype (PEFT's too)
            if param.requires_grad:
                param.data = param.data.float()
        self.root = None  # under FSDP: the sharded model's root module, whose forward is the loss
        if self.sharded:
            self.root, count = shard(self.model, plan, self.device)
            self.notes.append(f"FSDP over {ranks.world} processes: {count} layers sharded")
        self.named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.optimizer = make_optimizer(plan.optimizer, self.params, config.lr, config.weight_decay)
        # fp16 compute overflows without loss scaling; bf16 and fp32 have the range to go without.
        self.scaler = (torch.amp.GradScaler(self.device.type) if plan.compute_dtype == "float16" else None)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, plan.warmup_steps, plan.total_steps)
        self.model.train()
        self.memory: tuple[int, ...] = ()  # after each step: bytes held, by rank (step_memory)

    def _save_memory(self, plan) -> list[str]:
        """The plan's memory savers on the LoRA model (memory_savers/), each said in a note."""
        notes = []
        if plan.mlp_tile:
            tiled = tile_mlps(self.model, plan.mlp_tile)
            notes.append(f"MLP over tiles of {plan.mlp_tile} tokens in {tiled} layers")
        if plan.offload_checkpoints and plan.grad_checkpointing:
            to_host = self.device.type == "cuda"
            count = offload_checkpoints(self.model, to_host)
            notes.append(f"checkpoints offloaded: {count} layers "
                         f"({'to pinned host memory' if to_host else 'kept in place on the CPU'})")
        if plan.layer_tile and plan.grad_checkpointing:
            notes.append(self._tile_layers(plan))
        return notes

    def _tile_layers(self, plan) -> str:
        """Tile the checkpointed layers (after offloading: the tiled checkpoint offloads too)."""
        try:
            count = tile_layers(self.model, plan.layer_tile, plan.offload_checkpoints and self.device.type == "cuda")
        except NotTileable as err:
            return f"layers not tiled: {err}; they are checkpointed whole"
        return f"layers over tiles of {plan.layer_tile} tokens: {count}, all but attention"

    def prepare_reference(self, run_dir: Path, prepared: Prepared, log) -> None:
        """DPO's reference log-probs of every pair, from the run folder or computed now (before the
        first step: the model as it starts is the reference)."""
        if self.preference is None or self.preference.method != "dpo":
            return
        path = Path(run_dir) / REFERENCE_FILE
        reference = ReferenceLogps.load(path) if path.is_file() else None
        if reference is None or not reference.covers(prepared.train, prepared.val):
            pairs = len(prepared.train) + len(prepared.val)
            what = "its starting adapter (--from)" if prepared.start_adapter else "the base, adapter off"
            log(f"Reference log-probabilities of {pairs:,} pairs ({what}), once, without gradients…")
            reference = compute_reference(self.model, self.collate, self.plan.micro_batch,
                                          {"train": prepared.train, "val": prepared.val}, self.device,
                                          adapter_off=not prepared.start_adapter,
                                          answers_only=self.preference.answers_only,
                                          progress=lambda done, total: log(f"Reference: {done:,} of {total:,} pairs"))
            reference.save(path)
        self.preference.reference = reference

    def enable_checkpointing(self) -> None:
        """Switch gradient checkpointing on mid-run (the OOM back-off); no reload needed."""
        checkpointing_on(self.model)

    def free_step_memory(self) -> None:
        """Drop what a failed step left behind: gradients, and the allocator's cached blocks."""
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def collate(self, examples: list[Tokenized]) -> Batch:
        if self.plan.batching == "packed":
            return collate_packed(examples)
        return collate_padded(examples, self.pad_id)

    def train_step(self, batches: list[list[Tokenized]]) -> tuple[float, int, float]:
        """One optimizer step over these micro-batches: (mean loss, real tokens, grad norm)."""
        import torch

        tensors = [self.collate(batch) for batch in batches]
        if self.preference is not None:  # dpo/orpo: the loss is per pair (one process: validate_config)
            targets = self.preference.attach(batches, tensors)
        else:
            targets = max(1, sum(batch.trained_tokens for batch in tensors))  # the whole step's, on every rank
        loss_total, tokens = 0.0, 0
        mine = self.ranks.share(tensors) if self.ranks else tensors
        passes = [(batch, 1.0) for batch in mine]
        if self.sharded:  # every rank the same passes (FSDP's collectives): a short rank's extra weighs 0
            passes += [(tensors[0], 0.0)] * (-(-len(tensors) // self.ranks.world) - len(mine))
        scale = gradient_scale(self.ranks) if self.sharded else 1.0
        for index, (batch, weight) in enumerate(passes):
            if self.on_pass is not None:  # the step's progress (train/interrupt.StepWatch)
                self.on_pass(index, len(passes), tokens)
            if self.sharded:  # the gradients go over the wire once a step, after its last pass
                self.root.set_requires_gradient_sync(index == len(passes) - 1)
            loss_sum = self.loss_sum(batch)
            scaled = loss_sum * (weight * scale / targets)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_total += weight * float(loss_sum.detach())
            tokens += batch.real_tokens if weight else 0
        if self.ranks:  # each rank's share summed: one process's gradient over the whole step
            if not self.sharded:  # (FSDP sums the sharded gradients itself)
                self.ranks.sum_gradients(self.params)
            loss_total, tokens = self.ranks.sum(loss_total, tokens)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        grad_norm = float(full_tensor(norm))  # a DTensor under FSDP
        if self.scaler:  # skips the step when the scaled gradients overflowed, and adjusts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        held = step_memory(self.device)
        self.memory = tuple(int(v) for v in self.ranks.gather(held)) if self.ranks else (held,)
        return loss_total / targets, tokens, grad_norm

    def evaluate(self, examples: list[Tokenized]) -> float:
        """Mean token loss over `examples` (a preference run: the mean loss of the held-out pairs, and
        their measures in `eval_preference`), without dropout or gradients."""
        import torch

        self.model.eval()
        total, count = 0.0, 0
        training_tally = self.preference.take_tally() if self.preference is not None else None
        with torch.no_grad():
            for start in range(0, len(examples), self.plan.micro_batch):
                chunk = examples[start:start + self.plan.micro_batch]
                batch = self.collate(chunk)
                if self.preference is not None:  # summed over the chunk's pairs
                    self.preference.attach([chunk], [batch], "val")
                    total += float(self.loss_sum(batch))
                    count += len(chunk)
                else:
                    total += float(self.loss_sum(batch))
                    count += batch.trained_tokens
        self.model.train()
        if self.preference is not None:
            self.eval_preference = self.preference.take()
            self.preference.tally = training_tally
        return total / max(1, count)

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def loss_sum(self, batch: Batch):
        """Summed cross-entropy of `batch`'s targets, computed the way the plan says."""
        if self.preference is not None:
            return self.preference.loss(self.model, batch, self.device)
        if self.root is not None:
            return self.root(batch)
        return loss_sum(self.model, batch, self.device, self.plan.loss)

    # -- persistence ---------------------------------------------------------------------------
    def save_checkpoint(self, path: Path, state: dict) -> None:
        """Adapter, optimizer, schedule, RNG and loop state, written in one piece (by rank 0 of a run
        on several processes, the others waiting: every rank holds the same state)."""
        import torch

        lora, staging = None, sharded.staging_for(path)
        if self.sharded:  # every rank: the LoRA weights gathered, its share of the optimizer written
            lora = sharded.gathered_lora(self.named, self.ranks.main)
            sharded.save_optimizer(self.root, self.optimizer, self.ranks, staging)
        if self._not_the_writer():
            return
        with staged_dir(path, replace=True) as tmp:
            self.model.save_pretrained(tmp, **({"state_dict": lora} if self.sharded else {}))
            if self.sharded:
                os.replace(staging, tmp / sharded.OPTIMIZER_DIR)
            else:
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if self.scaler:
                torch.save(self.scaler.state_dict(), tmp / "scaler.pt")
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng.pt")
            write_json(tmp / "state.json", {**state, "manifest": True,
                                            **({"optimizer_shards": self.ranks.world} if self.sharded else {})})
            write_manifest(tmp)  # flushed to disk, sizes and checksums: see Run.checkpoints
        if self.ranks:
            self.ranks.barrier()

    def restore(self, path: Path) -> None:
        """Continue exactly where the checkpoint at `path` left off."""
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        if self.sharded != (path / sharded.OPTIMIZER_DIR).is_dir():
            raise RunError(f"{path.name}: its optimizer state is {'not ' * self.sharded}sharded with FSDP, "
                           f"and this plan ({self.plan.strategy or 'one process'}) "
                           f"{'shards' if self.sharded else 'does not'}; resume with the run's own --gpus")
        if self.sharded:
            sharded.load_lora(self.named, load_file(str(path / "adapter_model.safetensors")))
            sharded.load_optimizer(self.root, self.optimizer, path / sharded.OPTIMIZER_DIR)
        else:
            weights = load_file(str(path / "adapter_model.safetensors"), device=str(self.device))
            set_peft_model_state_dict(self.model, weights)
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True,
                                                      map_location=self.device))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        if self.scaler and (path / "scaler.pt").exists():
            self.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def save_adapter(self, path: Path, tokenizer, note: dict | None = None) -> None:
        """The final PEFT adapter (safetensors + adapter_config.json) with the tokenizer; `note`, as
        tunesmith.json in the same folder, written in the same piece (which step it is)."""
        lora = gathered_lora(self.named, self.ranks.main) if self.sharded else None
        if self._not_the_writer():
            return
        with staged_dir(path, replace=True) as tmp:
            self.model.save_pretrained(tmp, **({"state_dict": lora} if self.sharded else {}))
            tokenizer.save_pretrained(tmp)
            if note is not None:
                (Path(tmp) / ADAPTER_NOTE).write_text(json.dumps(note), encoding="utf-8")
        if self.ranks:
            self.ranks.barrier()

    def _not_the_writer(self) -> bool:
        """True on ranks other than 0, after waiting for rank 0 to write."""
        if self.ranks is None or self.ranks.main:
            return False
        self.ranks.barrier()
        return True

    def release(self) -> None:
        """Free the model and optimizer, and the GPU memory they held."""
        import torch

        self.model = self.optimizer = self.scheduler = self.scaler = None
        self.params = []
        torch.set_num_threads(self.threads_before)
        clear_mask_cache()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def start_from_adapter(model, adapter: str, device) -> str:
    """Load a finished run's LoRA weights into `model`'s (same rank and layers: prepare.py checks)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(adapter) / "adapter_model.safetensors"), device=str(device))
    set_peft_model_state_dict(model, weights)
    return f"started from the adapter in {adapter}"


def freeze_for_lora(model, grad_checkpointing: bool) -> None:
    """Freeze the base model and switch checkpointing on or off, keeping its 16-bit weights 16-bit.

    PEFT's `prepare_model_for_kbit_training` also casts every non-4-bit weight to fp32; for the
    embeddings and lm_head of a 128k-vocabulary model that is 2 GB more on the card for frozen
    weights that gain nothing from the precision, so we only do the freezing and checkpointing."""
    for param in model.parameters():
        param.requires_grad = False
    if grad_checkpointing:
        checkpointing_on(model)


def checkpointing_on(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant, so LoRA's inputs
    get gradients without PEFT's input-grad hook). transformers 5 renamed the switch."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def self_test(plan, facts, device) -> SelfTestResult:
    """The start-up self-test of the plan's kernels, shaped like the model's layers (`facts`, the
    model's ArchFacts; None for a layout we do not know, which skips it)."""
    if facts is None:
        return SelfTestResult(plan, ["self-test: skipped, the model's layout is not one we know"])
    capability = None
    if device.type == "cuda":
        import torch

        capability = tuple(torch.cuda.get_device_capability(device))
    shapes = Shapes(facts.heads, facts.kv_heads, facts.head_dim, facts.hidden, facts.attention_softcap)
    return run_selftest(plan, shapes, capability)


def step_memory(device) -> int:
    """The measure a plan's predicted peak predicts, after a step: on CUDA torch's peak allocation
    on the card so far (never reset here: memory_probe and the app's graph read the same counter),
    on the CPU the process's peak resident RAM since the run was planned (prepare.py resets it)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))

    return process_peak_ram() or process_ram()
