"""The memory estimator never predicts less than a real step needs, on shapes it was not fitted on.

benchmarks/estimator_grid.py measured real training steps of the two shapes the estimator was
fitted on and of model shapes it was not fitted on, and committed them
(benchmarks/results/estimator_grid-cpu.json). The tests recompute each row's prediction with the
estimator as it is now, so a change that under-predicts any row, or overshoots a held-out one by
more than 12 %, fails here; the slow one measures a held-out shape live.
"""

import json
import sys
from pathlib import Path

import pytest

from app.core.models.architecture import arch_facts
from app.core.models.catalog import find_in_catalog
from app.core.plan.memory import MemorySetup, estimate_memory

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results" / "estimator_grid-cpu.json"
MAX_OVER = 0.12


def predicted_now(spec: dict) -> int:
    """The current estimator's peak (without the CUDA context) for a grid row's configuration."""
    config = dict(find_in_catalog(spec["model"]).config(), num_hidden_layers=spec["layers"])
    config.pop("layer_types", None)
    rows = 2 if spec.get("method", "sft") != "sft" and spec["batching"] != "packed" else 1  # padded pairs: 2 rows
    setup = MemorySetup(rank=spec["rank"], seq_len=spec["seq_len"], micro_batch=spec["micro_batch"] * rows,
                        grad_checkpointing=spec["checkpointing"], compute_dtype="float32", optimizer="adamw_torch",
                        device="cpu", lora_dropout=spec["lora_dropout"] > 0, loss=spec["loss"],
                        attention=spec["attention_ran"], quantize=spec["quantize"])
    estimate = estimate_memory(arch_facts(config), setup)
    return estimate.peak - estimate.runtime_overhead


def grid_rows(prefix: str = "") -> list[dict]:
    """The rows whose grid name starts with `prefix` (every row for ""), each grid's from the newest
    run that measured it (a run may measure one grid only)."""
    runs = json.loads(RESULTS.read_text())["runs"]
    newest = {row["grid"]: run for run in runs for row in run["rows"]}  # the later run wins
    rows = [r for grid, run in newest.items() if grid.startswith(prefix) for r in run["rows"] if r["grid"] == grid]
    return [dict(r["spec"], grid=r["grid"], attention_ran=r["attention_ran"], measured=r["measured_bytes"])
            for r in rows]


def test_the_committed_grid_has_preference_rows_of_both_methods_and_batchings():
    rows = grid_rows("held-out-preference")
    assert {r["method"] for r in rows} == {"dpo", "orpo"} and {r["batching"] for r in rows} == {"packed", "grouped"}
    assert len({r["model"] for r in rows}) >= 4


def test_the_committed_grid_covers_five_families_both_bases_and_both_losses():
    rows = grid_rows("held-out")
    fitted = {r["model"] for r in grid_rows("fit")}
    assert len({r["model"] for r in rows}) >= 5 and not fitted & {r["model"] for r in rows}
    assert {r["quantize"] for r in rows} == {"4bit", "none"}
    assert {r["loss"] for r in rows} == {"plain", "chunked"}
    assert {r["checkpointing"] for r in rows} == {True, False}
    assert {r["batching"] for r in rows} == {"packed", "grouped"}
    assert {"eager", "sdpa"} <= {r["attention_ran"] for r in rows}


def _label(row: dict) -> str:
    return (f"{row['grid']}-{row['model'].split('/')[-1]}-{row['seq_len']}x{row['micro_batch']}-r{row['rank']}-"
            f"{row['loss']}-{row['batching']}-{row['quantize']}-ckpt{int(row['checkpointing'])}"
            + (f"-{row['method']}" if row.get("method", "sft") != "sft" else ""))


@pytest.mark.parametrize("row", grid_rows(), ids=_label)
def test_the_estimator_never_predicts_less_than_a_step_measured(row):
    predicted = predicted_now(row)
    assert predicted >= row["measured"], f"under-predicts: {predicted / row['measured'] - 1:+.1%}"
    if row["grid"].startswith("held-out"):
        assert predicted <= (1 + MAX_OVER) * row["measured"], f"overshoots: {predicted / row['measured'] - 1:+.1%}"


@pytest.mark.slow
def test_a_held_out_shape_measured_now_is_not_under_predicted():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from memory_calibration import measure

    measured = measure("microsoft/Phi-3.5-mini-instruct", 384, 16, False, 1, device="cpu", dtype="float32",
                       warm_steps=1, loss="chunked", layers=1, batching="packed", quantize="4bit",
                       examples_per_row=3)
    ratio = measured["peak_predicted"] / measured["peak_allocated"]
    assert 1 <= ratio <= 1 + MAX_OVER, f"{ratio - 1:+.1%}"
