"""Preference tuning (DPO, ORPO): the pairs' formats and their line-level problems, how a pair is
tokenised and batched, our losses and LoRA gradients against TRL's, and real runs of a tiny model:
stop and resume, --from, ORPO. The demo-model acceptance run is in test_preference_demo.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO

PAIRS = [
    {"prompt": "How do I make bread?", "chosen": "Ahoy, knead it well, matey!", "rejected": "Knead it."},
    {"prompt": "What is a roux?", "chosen": "Arr, flour and butter cooked together.", "rejected": "Flour and fat."},
    {"prompt": "Boil an egg?", "chosen": "Ahoy! Nine minutes in boiling water.",
     "rejected": "Boil it nine minutes, then cool it."},
    {"system": "You are terse.", "prompt": "Salt or sugar?", "chosen": "Arr, salt!", "rejected": "Sugar, I suppose."},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=REPO, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=600)


# -- the data --------------------------------------------------------------------------------------
def test_every_shape_of_pair_is_read(tmp_path):
    from app.core.data.validate import check_file

    user = {"role": "user", "content": "Hi?"}
    rows = [PAIRS[0], PAIRS[3],
            {"prompt": [user], "chosen": [{"role": "assistant", "content": "Ahoy!"}],
             "rejected": [{"role": "assistant", "content": "Hello."}]},
            {"chosen": [user, {"role": "assistant", "content": "Ahoy!"}],
             "rejected": [user, {"role": "assistant", "content": "Hello."}]}]
    report = check_file(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert report.ok and report.format == "preference"
    first, system, listed, whole = report.examples
    assert first.messages == [{"role": "user", "content": "How do I make bread?"}]
    assert first.chosen == [{"role": "assistant", "content": "Ahoy, knead it well, matey!"}]
    assert system.messages[0] == {"role": "system", "content": "You are terse."}
    assert listed.messages == whole.messages == [user]  # whole conversations: the shared start is the prompt
    assert whole.chosen == [{"role": "assistant", "content": "Ahoy!"}]
    assert whole.rejected == [{"role": "assistant", "content": "Hello."}]


def test_every_bad_pair_gets_its_line_and_training_refuses(tmp_path):
    user = {"role": "user", "content": "q"}
    rows = [PAIRS[0],
            {"prompt": "Hi", "chosen": "", "rejected": "x"},
            {"prompt": "Hi", "chosen": "same", "rejected": "same"},
            {"chosen": [user, {"role": "assistant", "content": "a"}], "rejected": [user]},
            {"prompt": "q", "chosen": "a"},
            {"chosen": "a", "rejected": "b"},
            "{not json",
            PAIRS[1]]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    checked = cli("check-data", str(data))
    assert checked.returncode == 2, checked.stdout + checked.stderr
    out = checked.stdout + checked.stderr
    for line, words in [(2, "chosen: is empty"), (3, "is the same as 'chosen'"), (4, "rejected: no assistant turn"),
                        (5, "missing 'rejected'"), (6, "missing 'prompt'"), (7, "")]:
        assert f"bad.jsonl:{line}:" in out and words in out, (line, out)
    trained = cli("train", "--data", str(data), "--method", "dpo", "--max-steps", "1")
    assert trained.returncode == 2
    assert "bad.jsonl:2: chosen: is empty" in trained.stderr and "and 5 more problems" in trained.stderr
    assert "Traceback" not in trained.stderr
    runs = Path(os.environ["TUNESMITH_HOME"]) / "data" / "runs"
    assert not runs.exists() or not list(runs.iterdir())  # nothing trained, no run folder


def test_the_method_must_fit_the_data(tmp_path, tiny_model, chat_data):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 3)
    as_sft = cli("train", "--model", str(tiny_model), "--data", str(pairs), "--max-steps", "1")
    assert as_sft.returncode == 2 and "preference pairs" in as_sft.stderr and "--method dpo" in as_sft.stderr
    as_dpo = cli("train", "--model", str(tiny_model), "--data", str(chat_data), "--method", "dpo", "--max-steps", "1")
    assert as_dpo.returncode == 2 and "--method dpo trains on preference pairs" in as_dpo.stderr
    two = cli("train", "--model", str(tiny_model), "--data", str(pairs), "--method", "orpo", "--gpus", "2")
    assert two.returncode == 2 and "one process" in two.stderr
    checked = cli("check-data", str(pairs), "--seq-len", "80")  # the demo's tokenizer: ~92 tokens, 59 with "terse"
    assert checked.returncode == 0 and "format     preference pairs" in checked.stdout
    truncated = next(line for line in checked.stdout.splitlines() if "longer than 80 tokens" in line)
    count, lines = truncated.split()[1], truncated.split("tokens: lines ")[1].split(", ")
    # each pair named by its line: all but the terse one (its own short system prompt replaces the default)
    assert int(count) == len(lines) and [int(n) for n in lines] == [n for n in range(1, 13) if n % 4], truncated


def test_a_pair_learns_only_its_answers_and_each_side_is_its_own_sequence(tiny_tokenizer):
    from app.core.data.formats import normalise
    from app.core.data.packing import collate_packed, collate_padded
    from app.core.data.tokenize import IGNORE, tokenize_one, truncate

    pair = tokenize_one(tiny_tokenizer, normalise(PAIRS[0], "preference", 1))
    chosen, rejected = pair.side(0), pair.side(1)
    learned = lambda side: tiny_tokenizer.decode([t for t, label in zip(side.input_ids, side.labels)  # noqa: E731
                                                  if label != IGNORE])
    assert learned(chosen).startswith("Ahoy, knead it well, matey!") and "bread" not in learned(chosen)
    assert learned(rejected).startswith("Knead it.") and "Ahoy" not in learned(rejected)
    assert chosen.input_ids[:5] == rejected.input_ids[:5]  # the same prompt
    packed = collate_packed([pair, pair])
    assert packed.pairs and packed.segments == ((0, pair.split), (pair.split, len(pair.input_ids)),
                                                (len(pair.input_ids), len(pair.input_ids) + pair.split),
                                                (len(pair.input_ids) + pair.split, 2 * len(pair.input_ids)))
    assert packed.position_ids[0, pair.split] == 0  # the rejected side starts again at position 0
    padded = collate_padded([pair], tiny_tokenizer.pad_token_id)
    assert padded.input_ids.shape[0] == 2 and padded.sequences == 2
    (cut,), was_cut, dropped = truncate([pair], len(pair.input_ids) - 4)
    assert was_cut == 1 and not dropped and len(cut.input_ids) == len(pair.input_ids) - 4
    assert cut.side(0).input_ids == chosen.input_ids[:len(cut.side(0).input_ids)]  # each side keeps its start
    assert cut.side(1).input_ids == rejected.input_ids[:len(cut.side(1).input_ids)]


# -- the losses against TRL's ----------------------------------------------------------------------
@pytest.fixture
def trl_dpo(tiny_model):
    """TRL's DPOTrainer on the tiny model with a random (not zero) LoRA adapter, so that the policy
    differs from the reference (the adapter switched off), and its first batch of our pairs."""
    pytest.importorskip("trl")
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    args = DPOConfig(output_dir=os.environ["TUNESMITH_HOME"], report_to=[], beta=0.1, max_length=None,
                     per_device_train_batch_size=len(PAIRS), use_cpu=True, bf16=False)
    rows = [{k: v for k, v in row.items() if k != "system"} for row in PAIRS]
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora)
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    return trainer, examples, tokenizer


def our_pairs(examples):
    """TRL's tokenised pairs as ours: prompt + chosen, then prompt + rejected, the prompt not learned."""
    from app.core.data.tokenize import IGNORE, Tokenized

    pairs = []
    for line, row in enumerate(examples, 1):
        prompt, chosen, rejected = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
        pairs.append(Tokenized(line, prompt + chosen + prompt + rejected,
                               [IGNORE] * len(prompt) + chosen + [IGNORE] * len(prompt) + rejected,
                               split=len(prompt) + len(chosen)))
    return pairs


def our_loss(model, pairs, collate, method: str, beta: float, answers_only: bool):
    """Our mean loss of `pairs` as one micro-batch of one step (DPO's reference computed first, the
    adapter off), its gradients left in `model`."""
    from app.core.train.preference import PreferenceObjective, compute_reference

    reference = compute_reference(model, collate, 2, {"train": pairs}, "cpu", adapter_off=True,
                                  answers_only=answers_only) if method == "dpo" else None
    objective = PreferenceObjective(method, beta, reference, answers_only=answers_only)
    batch = collate(pairs)
    pairs_in_step = objective.attach([pairs], [batch])
    loss = objective.loss(model, batch, "cpu") / pairs_in_step
    loss.backward()
    return loss


def lora_grads(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_close(ours: dict, theirs: dict, tolerance: float = 1e-4) -> None:
    assert ours.keys() == theirs.keys() and ours
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    assert worst < tolerance, worst
    assert max(float(v.abs().max()) for v in theirs.values()) > 100 * tolerance  # gradients that say something


@pytest.mark.parametrize("answers_only", [True, False], ids=["lm_head-on-answers", "full-logits"])
def test_dpo_loss_and_gradients_equal_trl(trl_dpo, answers_only):
    from app.core.data.packing import collate_padded

    trainer, examples, tokenizer = trl_dpo
    model = trainer.model
    model.train()
    theirs = trainer._compute_loss(model, trainer.data_collator(examples), False)
    theirs.backward()
    their_grads = lora_grads(model)
    model.zero_grad()

    collate = lambda batch: collate_padded(batch, tokenizer.pad_token_id)  # noqa: E731
    ours = our_loss(model, our_pairs(examples), collate, "dpo", 0.1, answers_only)  # its gradients in the model
    assert abs(float(ours) - float(theirs)) < 1e-4 and abs(float(theirs) - 0.6931) > 1e-3  # not a trivial ln 2
    assert_close(lora_grads(model), their_grads)


def test_packed_pairs_give_the_padded_loss(trl_dpo):
    """The packed row (each side attending only to itself, our varlen attention) and the padded rows
    give the same DPO loss and gradients: one forward for both sides loses nothing."""
    from app.core.data.packing import collate_packed, collate_padded
    from app.core.train.kernels import attention_for

    trainer, examples, tokenizer = trl_dpo
    model, pairs = trainer.model, our_pairs(examples)
    model.train()
    results = []
    for collate, attention in ((lambda b: collate_padded(b, tokenizer.pad_token_id), "sdpa"),
                               (collate_packed, attention_for("", True, "cpu"))):
        model.base_model.model.set_attn_implementation(attention)
        model.zero_grad()
        loss = our_loss(model, pairs, collate, "dpo", 0.1, answers_only=True)
        results.append((float(loss), lora_grads(model)))
    assert abs(results[0][0] - results[1][0]) < 1e-5
    assert_close(results[1][1], results[0][1], 1e-5)


def test_orpo_loss_and_gradients_equal_trl(trl_dpo):
    """ORPO against TRL's own pieces (ORPOTrainer.get_batch_logps and odds_ratio_loss) with the NLL
    on the chosen answers' tokens (TRL's ORPOTrainer also counts the prompt's; the paper's is the answer's)."""
    import torch
    import torch.nn.functional as F
    from trl.experimental.orpo import ORPOTrainer

    from app.core.data.packing import collate_padded
    from app.core.data.tokenize import IGNORE

    trainer, examples, tokenizer = trl_dpo
    model, pairs, beta = trainer.model, our_pairs(examples), 0.25
    model.train()
    batch = collate_padded(pairs, tokenizer.pad_token_id)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    labels = torch.full_like(batch.input_ids, IGNORE)  # TRL's labels: the token itself, shifted inside
    labels[:, 1:] = batch.targets[:, :-1]
    average = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    odds, _, _, _, _ = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu")),
                                                   average[0::2], average[1::2])
    chosen_logits, chosen_labels = logits[0::2, :-1], labels[0::2, 1:]
    nll = F.cross_entropy(chosen_logits.reshape(-1, logits.size(-1)), chosen_labels.reshape(-1), ignore_index=IGNORE)
    theirs = nll - odds.mean()
    theirs.backward()
    their_grads = lora_grads(model)
    model.zero_grad()

    ours = our_loss(model, pairs, lambda batch: collate_padded(batch, tokenizer.pad_token_id), "orpo", beta,
                    answers_only=True)
    assert abs(float(ours) - float(theirs)) < 1e-4
    assert_close(lora_grads(model), their_grads)


# -- runs of the tiny model ------------------------------------------------------------------------
def preference_config(model, data, method="dpo", **changes):
    from app.core.config import TrainConfig

    values = dict(model=str(model), data=str(data), method=method, seq_len=128, micro_batch=2, grad_accum=1, lr=5e-3,
                  max_steps=6, save_every=100, lora_dropout=0.0, quantize="none", report="off", val_split=20)
    return TrainConfig(**{**values, **changes})


def train(config, stop_at=None):
    from app.core.events import StepMetrics
    from app.core.train.trainer import run_training

    stop, events = threading.Event(), []

    def on_event(event):
        events.append(event)
        if stop_at is not None and isinstance(event, StepMetrics) and event.step >= stop_at:
            stop.set()

    return run_training(config, on_event, stop), events


def adapter_weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def test_a_dpo_run_stops_and_resumes_to_the_same_adapter(tmp_path, tiny_model):
    from app.core.events import PreferenceMetrics
    from app.core.train.trainer import resume_training

    data = write_jsonl(tmp_path / "pairs.jsonl", [dict(row, prompt=f"{row['prompt']} ({i})")
                                                  for i in range(5) for row in PAIRS])
    whole, events = train(preference_config(tiny_model, data))
    assert whole.status == "finished", whole.reason
    measured = [e for e in events if isinstance(e, PreferenceMetrics)]
    assert {e.split for e in measured} == {"train", "eval"}
    assert measured[-1].margin != 0 and 0 <= measured[-1].accuracy <= 1
    logged = [json.loads(line) for line in (Path(whole.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for e in logged if e["event"] == "PreferenceMetrics" and e["split"] == "train") == 6
    assert (Path(whole.run_dir) / "reference_logps.pt").is_file()

    stopped, _ = train(preference_config(tiny_model, data), stop_at=3)
    assert stopped.status == "stopped" and stopped.step == 3
    resumed = resume_training(stopped.run_id)
    assert resumed.status == "finished" and resumed.step == 6
    ours, theirs = adapter_weights(resumed.run_dir), adapter_weights(whole.run_dir)
    assert all(float((ours[k] - theirs[k]).abs().max()) < 1e-5 for k in ours)

    from app.core.export.exporter import export_run  # a preference run's adapter exports as an SFT run's does

    merged = export_run(resumed.run_id, "merged", tmp_path / "merged")
    assert "model.safetensors" in merged.files and "config.json" in merged.files


def test_orpo_trains_and_dpo_starts_from_an_sft_run(tmp_path, tiny_model, chat_data):
    import torch

    from app.core.config import TrainConfig
    from app.core.train.preference import ReferenceLogps

    data = write_jsonl(tmp_path / "pairs.jsonl", [dict(row, prompt=f"{row['prompt']} ({i})")
                                                  for i in range(5) for row in PAIRS])
    orpo, events = train(preference_config(tiny_model, data, "orpo", max_steps=8))
    assert orpo.status == "finished", orpo.reason
    losses = [e.loss for e in events if type(e).__name__ == "StepMetrics"]
    assert losses[-1] < losses[0]

    sft, _ = train(TrainConfig(model=str(tiny_model), data=str(chat_data), seq_len=128, micro_batch=4, max_steps=3,
                               lr=5e-3, rank=8, quantize="none", report="off", lora_dropout=0.0))
    assert sft.status == "finished"
    dpo, _ = train(preference_config(tiny_model, data, start_from=sft.run_id, max_steps=2))
    assert dpo.status == "finished", dpo.reason
    config = json.loads((Path(dpo.run_dir) / "config.json").read_text())
    assert config["rank"] == 8 and config["start_from"] == sft.run_id  # the SFT adapter's shape, adopted
    log = (Path(dpo.run_dir) / "train.log").read_text()
    assert "its starting adapter (--from)" in log and "started from the adapter" in log
    # the reference is the SFT adapter, not the base: its log-probs differ from a plain DPO run's
    plain, _ = train(preference_config(tiny_model, data, max_steps=1, rank=8))
    theirs = ReferenceLogps.load(Path(plain.run_dir) / "reference_logps.pt").values
    ours = ReferenceLogps.load(Path(dpo.run_dir) / "reference_logps.pt").values
    assert ours.keys() == theirs.keys()
    assert any(not torch.allclose(ours[k][0], theirs[k][0]) for k in ours)

    listed = cli("runs").stdout
    for run, method in ((orpo, "ORPO"), (sft, "SFT"), (dpo, "DPO")):
        assert any(line.startswith(run.run_id) and f" {method} " in line for line in listed.splitlines()), listed
    refused = cli("train", "--model", str(tiny_model), "--data", str(data), "--method", "dpo", "--from", orpo.run_id,
                  "--rank", "4")
    assert refused.returncode == 2 and "rank 16" in refused.stderr and "drop --rank" in refused.stderr


def test_the_long_context_rungs_train_a_dpo_run_to_the_same_adapter(tmp_path, tiny_model):
    """Checkpointing, MLP and layer tiles and offloaded checkpoints change memory, not the result,
    for pairs as for SFT examples."""
    data = write_jsonl(tmp_path / "pairs.jsonl", [dict(row, prompt=f"{row['prompt']} ({i})")
                                                  for i in range(5) for row in PAIRS])
    plain, _ = train(preference_config(tiny_model, data, max_steps=3, val_split=0))
    tiled, _ = train(preference_config(tiny_model, data, max_steps=3, val_split=0, mlp_tile=16, layer_tile=16,
                                       offload_checkpoints=True))
    assert plain.status == tiled.status == "finished", (plain.reason, tiled.reason)
    assert "layers over tiles of 16 tokens" in (Path(tiled.run_dir) / "train.log").read_text()
    ours, theirs = adapter_weights(tiled.run_dir), adapter_weights(plain.run_dir)
    assert any(float(v.abs().max()) > 0 for k, v in theirs.items() if "lora_B" in k)  # it trained
    assert all(float((ours[k] - theirs[k]).abs().max()) < 1e-5 for k in ours)


def test_the_reference_pass_says_how_far_it_is(trl_dpo, monkeypatch):
    from app.core.data.packing import collate_packed
    from app.core.train import preference

    trainer, examples, _ = trl_dpo
    monkeypatch.setattr(preference, "REFERENCE_PROGRESS_S", 0.0)  # every chunk, instead of every 30 s
    heard = []
    preference.compute_reference(trainer.model, collate_packed, 1, {"train": our_pairs(examples)}, "cpu",
                                 adapter_off=True, progress=lambda done, total: heard.append((done, total)))
    assert heard == [(1, 4), (2, 4), (3, 4), (4, 4)]
