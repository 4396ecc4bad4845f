"""`python benchmarks/gpu_check.py`: without CUDA it says so and runs the CPU parts; every part runs in
a process of its own and one that passes its time cap is stopped and recorded "not reached", never
a hang. (`--cpu` with every part runs in tests/test_offline_kit.py's rehearsal, from the offline kit.)"""

import json
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

CHECK = REPO / "benchmarks" / "gpu_check.py"


def _no_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")


def test_without_cuda_the_gpu_check_says_so_and_runs_the_cpu_parts(tmp_path):
    _no_cuda()
    done = subprocess.run([sys.executable, str(CHECK), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0].startswith("No CUDA GPU here")
    report = json.loads((tmp_path / "gpu-cpu.json").read_text())
    assert [part["part"] for part in report["parts"]] == ["environment", "self-test"]
    assert report["meta"]["versions"]["torch"].startswith("2.")
    log = (tmp_path / "gpu-cpu.log").read_text()
    assert "## environment (at most" in log and "## self-test (at most" in log


def test_a_part_past_its_cap_is_stopped_and_recorded_not_reached_with_its_rows(tmp_path):
    _no_cuda()
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(CHECK), "--cpu", "--out", str(tmp_path), "--parts",
                           "environment,estimator", "--cap", "estimator=6"], capture_output=True, text=True,
                          timeout=300)
    took = time.monotonic() - started
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]  # a part not reached is not a pass
    report = json.loads((tmp_path / "gpu-cpu.json").read_text())
    status = {part["part"]: (part["status"], part["note"]) for part in report["parts"]}
    assert status["environment"][0] == "ok"
    assert status["estimator"][0] == "not reached"
    assert re.fullmatch(r"stopped at its cap of 6 s after [01] rows", status["estimator"][1])
    assert took < 45  # the estimator's two CPU configurations take ~30 s: it was stopped, not awaited
    assert "| estimator | not reached |" in (tmp_path / "gpu-cpu.md").read_text()


def test_a_part_that_would_start_after_the_budget_is_not_started(tmp_path):
    _no_cuda()
    done = subprocess.run([sys.executable, str(CHECK), "--cpu", "--out", str(tmp_path), "--parts",
                           "environment,self-test", "--budget-s", "60", "--since", str(time.time() - 55)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    parts = json.loads((tmp_path / "gpu-cpu.json").read_text())["parts"]
    assert [(p["part"], p["status"]) for p in parts] == [("environment", "not reached"), ("self-test", "not reached")]
    assert parts[0]["note"] == "not started: the budget of 60 s was spent"
