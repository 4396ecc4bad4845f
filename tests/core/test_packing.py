"""Padding-free packing and the fused loss: packed rows must train exactly like separate examples."""

from __future__ import annotations

import random

import pytest
import torch

from app.core.config import Plan, TrainConfig
from app.core.data.batches import EpochBatches, step_bounds
from app.core.data.packing import collate_packed, collate_padded, pack_examples
from app.core.data.tokenize import IGNORE, Tokenized
from app.core.train.memory_savers.fused_loss import linear_cross_entropy


def long_tail(count: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(2048, max(32, int(rng.lognormvariate(5.5, 0.9)))) for _ in range(count)]


def test_packing_places_every_example_once_within_the_budget():
    lengths = long_tail(2000)
    bins = pack_examples(lengths, 2048, seed=1)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in b) for b in bins) <= 2048
    fill = sum(lengths) / (len(bins) * 2048)
    assert fill > 0.97, f"bins only {fill:.1%} full"
    assert bins == pack_examples(lengths, 2048, seed=1)
    assert bins != pack_examples(lengths, 2048, seed=2)


def test_epochs_visit_the_same_bins_in_their_own_order():
    lengths = long_tail(300)
    plan = Plan(seq_len=2048, micro_batch=1, batching="packed", grad_accum=3)
    order = EpochBatches(lengths, plan, seed=5)
    plan.steps_per_epoch = -(-len(order) // 3)
    first = [order.for_step(s) for s in range(plan.steps_per_epoch)]
    second = [order.for_step(plan.steps_per_epoch + s) for s in range(plan.steps_per_epoch)]
    flat = lambda steps: [tuple(b) for step in steps for b in step]  # noqa: E731
    assert sorted(flat(first)) == sorted(flat(second)) == sorted(tuple(b) for b in order.bins)
    assert flat(first) != flat(second)
    assert all(1 <= len(step) <= 4 for step in first)


def test_step_bounds_share_batches_out_evenly():
    assert [step_bounds(10, 3, i) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert [step_bounds(2, 3, i) for i in range(3)] == [(0, 1), (1, 2), (1, 2)]


def test_packed_row_restarts_positions_and_never_predicts_across_examples():
    a = Tokenized(1, [5, 6, 7], [IGNORE, 6, 7])
    b = Tokenized(2, [8, 9], [8, 9])
    batch = collate_packed([a, b])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert batch.targets.tolist() == [[6, 7, IGNORE, 9, IGNORE]]
    assert batch.segments == ((0, 3), (3, 5)) and batch.real_tokens == 5 and batch.trained_tokens == 3
    padded = collate_padded([a, b], pad_id=0)
    assert padded.targets.tolist() == [[6, 7, IGNORE], [9, IGNORE, IGNORE]] and padded.real_tokens == 5


@pytest.mark.parametrize("rows", [3, 1000])
def test_fused_linear_cross_entropy_matches_plain_loss_and_gradients(rows):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(300, 16)
    targets = torch.randint(0, 300, (37,))
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (expected,) = torch.autograd.grad(plain * 0.5, hidden)
    from app.core.plan import kernel_choice as kernels  # the fused loss reads its chunk size there

    kernels.CHUNK_BYTES, old = rows * 4 * 300, kernels.CHUNK_BYTES  # force `rows` per chunk
    try:
        fused = linear_cross_entropy(hidden, weight, targets)
        (got,) = torch.autograd.grad(fused * 0.5, hidden)
        with torch.no_grad():
            no_grad = linear_cross_entropy(hidden, weight, targets)
    finally:
        kernels.CHUNK_BYTES = old
    assert torch.allclose(fused, plain, rtol=1e-5) and torch.allclose(no_grad, plain, rtol=1e-5)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.fixture
def session(tiny_model, chat_data, tunesmith_home):
    """The tiny model in 4-bit with LoRA, as a packed, fused-loss run trains it."""
    from app.core.train.prepare import prepare_training
    from app.core.train.session import QLoraSession

    prepared = prepare_training(TrainConfig(model=str(tiny_model), data=str(chat_data), seq_len=128,
                                            micro_batch=4, lora_dropout=0.0, max_steps=1))
    assert prepared.plan.batching == "packed" and prepared.plan.loss == "chunked"
    session = QLoraSession(prepared)
    session.model.eval()
    torch.nn.init.normal_(next(p for n, p in session.model.named_parameters() if "lora_B" in n), std=0.5)
    yield session, prepared.train
    session.release()


def test_packed_batch_loss_equals_the_mean_of_the_unpacked_examples_losses(session):
    from app.core.train.loss import loss_sum

    session, examples = session
    examples = examples[:4]
    assert len({len(e.input_ids) for e in examples}) > 1
    with torch.no_grad():
        alone = [(float(loss_sum(session.model, collate_padded([e], 0), "cpu")), collate_padded([e], 0).trained_tokens)
                 for e in examples]
        packed = collate_packed(examples)
        fused = float(loss_sum(session.model, packed, "cpu", "chunked"))
        logits = session.model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                               segments=packed.segments).logits[0].float()
    token_losses = torch.nn.functional.cross_entropy(logits, packed.targets[0], ignore_index=IGNORE, reduction="none")
    per_example = [float(token_losses[s:e].sum()) / n for (s, e), (_, n) in zip(packed.segments, alone)]
    unpacked = [total / n for total, n in alone]
    assert per_example == pytest.approx(unpacked, rel=1e-4)
    assert sum(per_example) / len(per_example) == pytest.approx(sum(unpacked) / len(unpacked), rel=1e-4)
    # the batch loss (mean over trained tokens) is the token-weighted mean of the examples' losses
    tokens = sum(n for _, n in alone)
    assert fused / tokens == pytest.approx(sum(total for total, _ in alone) / tokens, rel=1e-4)


def test_packed_training_gradients_equal_unpacked_gradients(session):
    from app.core.train.loss import loss_sum

    session, examples = session
    examples = examples[:3]
    params = session.params

    def grads(batches, loss):
        session.model.zero_grad(set_to_none=True)
        sum(loss_sum(session.model, b, "cpu", loss) for b in batches).backward()
        return torch.cat([p.grad.flatten() for p in params])

    separate = grads([collate_padded([e], 0) for e in examples], "plain")
    packed = grads([collate_packed(examples)], "chunked")
    # float32 sums in another order: errors scale with the largest gradient (164 here), not with each
    # element (on an AVX-512 machine one of 32,768 near-zero elements was off by 2.7e-5); attention
    # leaking across packed examples moves gradients by a large part of themselves
    assert torch.allclose(packed, separate, rtol=1e-3, atol=1e-6 * float(separate.abs().max()))
