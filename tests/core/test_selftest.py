"""The start-up self-test: each fast path is tried on the device before the model loads, and one
that fails is replaced by the next of its chain before step 1, with the plan, train.log and the
run's events saying which path ran."""

import json
from dataclasses import replace

import pytest

from app.core.config import Plan
from app.core.plan.kernel_choice import PACKED_LOOP, PACKED_MASKED
from app.core.train.selftest import Shapes, run_selftest
from tests.conftest import train_tiny

SHAPES = Shapes(heads=4, kv_heads=2, head_dim=16, hidden=64)
CPU_PLAN = Plan(device="cpu", compute_dtype="float32", optimizer="adamw_torch", batching="packed",
                attention=PACKED_LOOP, loss="chunked")


def raising_once(function):
    """`function`, except that its first call raises (a kernel broken on this machine)."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        return function(*args, **kwargs)

    wrapper.calls = calls
    return wrapper


def test_working_cpu_paths_pass_unchanged():
    result = run_selftest(CPU_PLAN, SHAPES)
    assert result.plan == CPU_PLAN and not result.fallbacks
    assert [line.split(" ok ")[0] for line in result.lines] == [
        "self-test: attention SDPA per example", "self-test: loss ours, chunked", "self-test: optimizer AdamW (torch)"]


def test_a_kernel_giving_wrong_numbers_is_replaced(monkeypatch):
    from app.core.train.memory_savers import packed_attention

    loop = packed_attention.packed_loop

    def unmasked(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        out, _ = loop(module, query, key, value, attention_mask, dropout, scaling,
                                              segments=((0, query.shape[2]),))
        return out, None  # ignores the examples' boundaries: runs, but attends across examples

    monkeypatch.setattr(packed_attention, "packed_loop", unmasked)
    result = run_selftest(CPU_PLAN, SHAPES)
    assert result.plan.attention == PACKED_MASKED
    assert "differs from the reference" in result.fallbacks[0][1]


def test_each_chain_falls_back_to_a_path_that_works(monkeypatch):
    from app.core.train import optimizer as qlora  # where the self-test finds them
    from app.core.train.memory_savers import fused_loss as kernels

    def broken_loss(*args, **kwargs):
        raise RuntimeError("triton: out of resources")

    real_optimizer = qlora.make_optimizer

    def no_paged(name, *args, **kwargs):
        if name == "paged_adamw_8bit":
            raise RuntimeError("paged memory is not available")
        return real_optimizer(name, *args, **kwargs)

    monkeypatch.setattr(kernels, "linear_cross_entropy", broken_loss)
    monkeypatch.setattr(qlora, "make_optimizer", no_paged)
    result = run_selftest(replace(CPU_PLAN, optimizer="paged_adamw_8bit"), SHAPES)
    assert result.plan.loss == "plain" and result.plan.optimizer == "adamw_torch"
    assert "failed the start-up self-test" in result.plan.reasons["loss"]
    assert [what for what, _ in result.fallbacks] == ["loss", "optimizer"]


def test_paged_8bit_adamw_passes_where_bitsandbytes_runs_it():
    result = run_selftest(replace(CPU_PLAN, optimizer="paged_adamw_8bit"), SHAPES)
    assert result.plan.optimizer == "paged_adamw_8bit", result.lines


def test_a_kernel_that_raises_on_its_first_call_is_replaced_before_step_1(monkeypatch, tiny_model, chat_data):
    from app.core.runs import open_run
    from app.core.train.memory_savers import packed_attention

    broken = raising_once(packed_attention.packed_loop)
    monkeypatch.setattr(packed_attention, "packed_loop", broken)
    result = train_tiny(tiny_model, chat_data, steps=2)
    assert result.status == "finished", result.reason
    assert len(broken.calls) == 1  # only the self-test's call: training never ran the broken path
    run = open_run(result.run_id)
    plan = run.plan()
    assert plan.attention == PACKED_MASKED
    assert "SDPA per example failed the start-up self-test" in plan.reasons["attention"]
    log = (run.dir / "train.log").read_text()
    assert "self-test: attention SDPA per example failed: RuntimeError: CUDA error" in log
    assert "attention: tunesmith_packed_masked" in log  # the line that says what loaded
    events = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    adjusted = [e for e in events if e["event"] == "PlanAdjusted"]
    assert adjusted and adjusted[0]["change"] == "attention" and "using SDPA with a block-diagonal mask" \
        in adjusted[0]["message"]


def test_no_working_path_is_a_bug_not_a_silent_success(monkeypatch):
    from app.core.train import optimizer as qlora  # where the self-test finds it

    def nothing_works(*args, **kwargs):
        raise RuntimeError("broken")

    monkeypatch.setattr(qlora, "make_optimizer", nothing_works)
    with pytest.raises(RuntimeError, match="no optimizer path works"):
        run_selftest(CPU_PLAN, SHAPES)
