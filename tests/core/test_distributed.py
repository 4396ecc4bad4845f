"""A run on several processes (app/core/train/parallel/launch.py, worker.py, distributed.py): torchrun starts
two gloo workers on this CPU machine, the same code that runs one worker per GPU (no GPU here:
NCCL and the cards' own memory are for the GPU check). Real steps of the tiny 4-bit model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.core.config import TrainConfig
from app.core.events import RunFailed, StepMetrics
from app.core.runs import Run, read_history
from app.core.train.trainer import resume_training, run_training


def config(model, data, gpus: int, accum: int, steps: int = 6, save_every: int = 100,
           strategy: str = "auto", report: str = "off") -> TrainConfig:
    return TrainConfig(model=str(model), data=str(data), seq_len=128, micro_batch=2, grad_accum=accum, lr=5e-3,
                       max_steps=steps, save_every=save_every, lora_dropout=0.0, quantize="4bit", gpus=gpus,
                       strategy=strategy, report=report)


def adapter(result) -> dict:
    return load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_processes_train_the_adapter_one_process_does_with_double_accumulation(tiny_model, chat_data,
                                                                                      tunesmith_home):
    events = []
    two = run_training(config(tiny_model, chat_data, gpus=2, accum=1, report="probes"), events.append)
    assert (Path(two.run_dir) / "report.md").exists()  # judged by the main process once the workers ended
    one = run_training(config(tiny_model, chat_data, gpus=1, accum=2))
    assert two.status == one.status == "finished", (two.reason, one.reason)
    run = Run(two.run_dir)
    assert run.plan().gpus == 2 and "2 processes on the CPU (gloo)" in run.plan().reasons["gpus"]
    assert read_history(run).losses == pytest.approx(read_history(Run(one.run_dir)).losses, rel=1e-5)
    assert [e.step for e in events if isinstance(e, StepMetrics)] == [1, 2, 3, 4, 5, 6]  # followed live
    memory = [e.memory for e in events if isinstance(e, StepMetrics)]
    assert all(len(m) == 2 and min(m) > 100 * 2**20 for m in memory), memory  # each process's RSS, by rank
    trained, reference = adapter(two), adapter(one)
    assert max(float(v.abs().max()) for k, v in reference.items() if "lora_B" in k) > 0.01  # it learned
    assert max_difference(trained, reference) < 1e-5
    assert "Training on 2 processes" in (Path(two.run_dir) / "train.log").read_text()


def test_a_stop_reaches_every_worker_and_resume_finishes_the_same_adapter(tiny_model, chat_data, tunesmith_home):
    stop = threading.Event()
    stopped = run_training(config(tiny_model, chat_data, gpus=2, accum=1, steps=60),
                           lambda e: stop.set() if isinstance(e, StepMetrics) and e.step >= 3 else None, stop)
    assert stopped.status == "stopped" and 3 <= stopped.step < 60, stopped.reason
    assert Run(stopped.run_dir).verified_checkpoint().name.endswith(str(stopped.step))  # saved where it stopped
    finished = resume_training(stopped.run_dir)
    assert finished.status == "finished" and finished.step == 60, finished.reason
    straight = run_training(config(tiny_model, chat_data, gpus=1, accum=2, steps=60))
    assert max_difference(adapter(finished), adapter(straight)) < 1e-4


def test_fsdp_shards_the_4_bit_model_over_two_processes_and_trains_the_same_adapter(tiny_model, chat_data,
                                                                                    tunesmith_home):
    """FSDP2 over two gloo processes: every decoder layer's NF4 weights, LoRA weights, gradients and
    optimizer state sharded; the same losses and adapter as one process with the step's micro-batches."""
    from app.core.atomic import manifest_problem
    from app.core.errors import RunError

    stop = threading.Event()
    stopped = run_training(config(tiny_model, chat_data, gpus=2, accum=1, steps=60, strategy="fsdp"),
                           lambda e: stop.set() if isinstance(e, StepMetrics) and e.step >= 3 else None, stop)
    assert stopped.status == "stopped", stopped.reason
    plan, run = Run(stopped.run_dir).plan(), Run(stopped.run_dir)
    assert (plan.strategy, plan.optimizer) == ("fsdp", "adamw_torch") and "set by you" in plan.reasons["gpus"]
    assert "FSDP over 2 processes: 2 layers sharded" in (run.dir / "train.log").read_text()
    checkpoint = run.verified_checkpoint()
    shards = sorted(p.name for p in (checkpoint / "optimizer").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"] and manifest_problem(checkpoint) == ""
    listed = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert {"optimizer/__0_0.distcp", "optimizer/__1_0.distcp", "adapter_model.safetensors"} <= listed.keys()
    assert not list(checkpoint.parent.glob(".*"))  # no staging folder left behind
    with pytest.raises(RunError, match="--gpus 1: this run shards its model over the GPUs"):
        resume_training(stopped.run_dir, gpus=1)
    finished = resume_training(stopped.run_dir)
    assert finished.status == "finished" and finished.step == 60, finished.reason
    straight = run_training(config(tiny_model, chat_data, gpus=1, accum=2, steps=60))
    assert read_history(run).losses == pytest.approx(read_history(Run(straight.run_dir)).losses, abs=1e-4)
    assert max_difference(adapter(finished), adapter(straight)) < 1e-4


def _worker_pid(run_dir: Path, rank: int) -> int | None:
    """The pid of the worker of `run_dir` with this rank (from /proc: our own processes)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"app.core.train.parallel.worker" in command and str(run_dir).encode() in command \
                and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_killed_worker_fails_the_run_with_the_reason_and_resume_finishes_it(tiny_model, chat_data, strategy,
                                                                              tunesmith_home, monkeypatch):
    from app.core.train.parallel import launch

    runs, killed, events = [], [], []
    original = launch.run_workers
    monkeypatch.setattr(launch, "run_workers", lambda run, *args: runs.append(run.dir) or original(run, *args))

    def on_event(event):
        events.append(event)
        if isinstance(event, StepMetrics) and event.step >= 6 and not killed:  # a checkpoint at step 5 exists
            pid = _worker_pid(runs[0], 1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(event.step)

    failed = run_training(config(tiny_model, chat_data, gpus=2, accum=1, steps=60, save_every=5, strategy=strategy),
                          on_event)
    assert killed, "the run ended before the test could kill a worker"
    assert failed.status == "failed" and Run(failed.run_dir).raw_status()["status"] == "failed"
    assert failed.reason.startswith("worker 1 died (killed by SIGKILL)") and "Resume continues" in failed.reason
    failures = [e for e in events if isinstance(e, RunFailed)]
    assert len(failures) == 1 and failures[0].reason == failed.reason  # the cause, once
    assert Run(failed.run_dir).verified_checkpoint() is not None
    checkpoint = Run(failed.run_dir).verified_checkpoint()
    saved = json.loads((checkpoint / "state.json").read_text())["step"]
    resumed = []
    finished = resume_training(failed.run_dir, resumed.append)
    assert finished.status == "finished" and finished.step == 60, finished.reason
    steps = [e.step for e in resumed if isinstance(e, StepMetrics)]
    assert saved >= 5 and steps == list(range(saved + 1, 61))  # from the checkpoint on, once each
    straight = run_training(config(tiny_model, chat_data, gpus=1, accum=2, steps=60))
    assert max_difference(adapter(finished), adapter(straight)) < 1e-4


def test_the_cli_trains_on_two_processes_and_says_so(tiny_model, chat_data, tunesmith_home, capsys):
    from app import cli

    assert cli.main(["train", "--model", str(tiny_model), "--data", str(chat_data), "--gpus", "2",
                     "--max-steps", "2", "--seq-len", "128", "--batch", "2", "--quantize", "4bit"]) == 0
    out = capsys.readouterr()
    assert "Training on 2 processes (2 processes on the CPU (gloo)" in out.out + out.err
    assert re.search(r"step 2/2 .* \| peak \d+\.\d/\d+\.\d GiB", out.out + out.err)  # by process
    assert cli.main(["plan", "--model", str(tiny_model), "--gpus", "64"]) == 2
    assert "--gpus 64: no GPU here" in capsys.readouterr().err


def test_gradients_of_ranks_without_a_micro_batch_count_as_zeros():
    """Ranks.sum_gradients with one process (gloo, world 1): None gradients become zeros."""
    import torch.distributed as dist

    from app.core.train.parallel.distributed import Ranks

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29731")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))
        a.grad = torch.tensor([1.0, 2.0, 3.0])
        Ranks(0, 1, 0).sum_gradients([a, b])
        assert a.grad.tolist() == [1.0, 2.0, 3.0] and b.grad.abs().sum() == 0
        assert Ranks(0, 1, 0).share(list(range(5))) == [0, 1, 2, 3, 4]
        assert Ranks(1, 2, 1).share(list(range(5))) == [1, 3]
    finally:
        dist.destroy_process_group()


def test_a_run_resumes_on_another_number_of_processes_with_the_same_steps(tiny_model, chat_data, tunesmith_home):
    from app.core.errors import RunError

    stop = threading.Event()
    stopped = run_training(config(tiny_model, chat_data, gpus=2, accum=1, steps=60),
                           lambda e: stop.set() if isinstance(e, StepMetrics) and e.step >= 3 else None, stop)
    assert stopped.status == "stopped", stopped.reason
    with pytest.raises(RunError, match="--gpus 3: each step of this run has 2 micro-batches.*--gpus 1 or 2"):
        resume_training(stopped.run_dir, gpus=3)
    finished = resume_training(stopped.run_dir, gpus=1)  # in this process now
    assert finished.status == "finished" and finished.step == 60, finished.reason
    plan = Run(finished.run_dir).plan()
    assert (plan.gpus, plan.grad_accum) == (1, 2) and plan.reasons["gpus"].startswith("resumed on 1 process")
    straight = run_training(config(tiny_model, chat_data, gpus=1, accum=2, steps=60))
    assert max_difference(adapter(finished), adapter(straight)) < 1e-4


def test_memory_by_process_reads_in_a_few_characters():
    from app.core.units import memory_text

    gib = 2**30
    assert memory_text(()) == "" and memory_text((0,)) == ""  # no figure, nothing shown
    assert memory_text((2 * gib,)) == "peak 2.0 GiB"
    assert memory_text((2 * gib, 3 * gib), " | ") == " | peak 2.0/3.0 GiB"
    assert memory_text([gib] * 7 + [4 * gib]) == "peak up to 4.0 GiB (process 7 of 8)"


def _node(rank: int, home: Path, model, data, port: int, *extra: str) -> subprocess.Popen:
    """One machine of a two-machine cluster: `tunesmith train` with its own home (run store)."""
    command = [sys.executable, "-m", "app", "train", "--model", str(model), "--data", str(data), "--gpus", "1",
               "--nodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "--max-steps", "6", "--seq-len", "128", "--batch", "2", "--grad-accum", "1", "--quantize", "4bit",
               "--lr", "5e-3", *extra]
    return subprocess.Popen(command, env={**os.environ, "TUNESMITH_HOME": str(home)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).resolve().parents[2])


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_machines_of_a_cluster_train_one_run_and_refuse_to_train_on_different_plans(tiny_model, chat_data,
                                                                                        tunesmith_home, tmp_path):
    """Two launchers on this machine stand in for two machines (--nodes 2, static rendezvous on
    127.0.0.1), each with its own run store: node 0 keeps the run, node 1 records its part."""
    homes = [tmp_path / "node0", tmp_path / "node1"]
    port = _free_port()
    nodes = [_node(rank, homes[rank], tiny_model, chat_data, port) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "This machine is node 1 of 2" in outputs[1] and "memory" in outputs[0]
    assert "Finished: node 1 of 2: trained its share; the run's progress, checkpoints and adapter are on node 0" \
        in outputs[1]
    first = Run(next((homes[0] / "data" / "runs").iterdir()))
    second = Run(next((homes[1] / "data" / "runs").iterdir()))
    assert first.raw_status()["status"] == "finished" and first.plan().nodes == 2
    assert second.raw_status()["reason"].startswith("node 1 of 2: trained its share")
    assert len(read_history(first).losses) == 6 and (first.adapter_dir / "adapter_model.safetensors").exists()
    assert not (second.adapter_dir / "adapter_model.safetensors").exists()  # written on node 0 only

    port = _free_port()
    nodes = [_node(0, tmp_path / "again0", tiny_model, chat_data, port),
             _node(1, tmp_path / "again1", tiny_model, chat_data, port, "--rank", "8")]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] != [0, 0]
    assert "process 1 of 2 has another plan than process 0" in outputs[0], outputs[0][-2000:]
