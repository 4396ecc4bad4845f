"""`python benchmarks/gpu_check.py --cpu` runs every part of the GPU acceptance check on the CPU
(those that need CUDA say so and are skipped) and writes its report."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu_and_reports_every_part(tmp_path, demo_model_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-cpu.json").read_text())
    status = {part["part"]: part["status"] for part in report["parts"]}
    assert status == {"environment": "ok", "self-test": "ok", "steps": "ok", "restore": "ok", "oom": "skipped",
                      "estimator": "ok", "long context": "ok", "throughput": "skipped", "gpu tests": "skipped"}
    steps = next(part for part in report["parts"] if part["part"] == "steps")["rows"]
    assert {(r["dtype"], r["batching"], r["checkpointing"]) for r in steps} == {
        (dtype, batching, ckpt) for dtype in ("float32", "float16") for batching in ("packed", "grouped")
        for ckpt in (False, True)}
    assert "| restore | ok |" in (tmp_path / "gpu-cpu.md").read_text()


def test_without_cuda_the_gpu_check_says_so_and_runs_the_cpu_parts(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0].startswith("No CUDA GPU here")
    parts = [part["part"] for part in json.loads((tmp_path / "gpu-cpu.json").read_text())["parts"]]
    assert parts == ["environment", "self-test"]
