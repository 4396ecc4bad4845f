"""Build an offline kit: the wheels a machine without internet lacks to train with Tunesmith and run
its GPU check, measured against a profile of what that machine already has.

    python packaging/offline_kit.py --have packaging/profiles/cuda-node.txt --out build/kit
    # on the machine, beside its own CUDA PyTorch (nothing is downloaded there):
    python3 -m pip install --no-index --no-deps --target ~/tunesmith-site build/kit/*.whl
    export PYTHONPATH=~/tunesmith-site; python3 -m app gpu    # the card, as Tunesmith sees it

A compute node behind a firewall comes with CUDA PyTorch and much of the Hugging Face stack, and
cannot `pip install`. The kit is this checkout as a wheel plus every package of Tunesmith's
training path, its fused kernels and the GPU check's yardstick (TRL) that the profile does not
list, with their own needs, chosen for the profile's versions (a release that needs a newer
transformers than the machine's is passed over). It never carries torch, Triton or CUDA
libraries, nor the window's Qt packages (the command line trains without them). A kit larger than
`--max-mib` is refused, naming the biggest wheels, and nothing is left behind; `kit.json` lists
what it holds and which of the machine's packages it relies on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
EXIT_USER_ERROR = 2
DEFAULT_EXTRAS = ("kernels", "bench")  # the fused CUDA kernels, and TRL for the throughput yardstick
GUI_ONLY = {"pyside6-essentials", "pyside6", "shiboken6", "pyqtgraph"}  # the window; the CLI trains without
# Never in a kit: the machine's own CUDA stack (torch's build must match its driver)
NEVER = ("torch", "triton", "pytorch-triton", "nvidia-", "cuda-")
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64",
                                                                        "manylinux1_x86_64", "linux_x86_64"]
MAX_TRIES = 12  # releases passed over per package before giving up


class KitError(Exception):
    """One line for the user: what, where, how to fix."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--have", required=True, help="profile of the machine: a package a line, name==version")
    parser.add_argument("--out", required=True, help="folder for the kit (an earlier kit there is replaced)")
    parser.add_argument("--python", default="", help="the machine's Python, e.g. 3.12 (default: the profile's)")
    parser.add_argument("--max-mib", type=float, default=56, help="refuse a kit larger than this (default 56)")
    parser.add_argument("--extras", default=",".join(DEFAULT_EXTRAS), help="tunesmith extras to include")
    args = parser.parse_args(argv)
    try:
        build_kit(Path(args.have), Path(args.out), args.python, args.max_mib,
                  [e for e in args.extras.split(",") if e])
    except KitError as err:
        print(f"offline_kit: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def build_kit(profile_file: Path, out: Path, python: str, max_mib: float, extras: list[str]) -> dict:
    """Resolve, download and check the kit; write it to `out` whole or not at all."""
    have, profile_python = read_profile(profile_file)
    python = python or profile_python or f"{sys.version_info.major}.{sys.version_info.minor}"
    _check_out(out)
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        print(f"Offline kit for {profile_file} (Python {python}, Linux x86-64): resolving...", flush=True)
        resolver = Resolver(have, python, staging)
        resolver.resolve(project_requirements(extras))
        ours = build_project_wheel(staging)
        wheels = [{"name": "tunesmith", "version": ours.name.split("-")[1], "file": ours.name,
                   "required_by": ["(this checkout)"]}] + resolver.wheels()
        for wheel in wheels:
            file = staging / wheel["file"]
            wheel["bytes"] = file.stat().st_size
            wheel["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
        total = sum(w["bytes"] for w in wheels)
        _print_wheels(wheels, total, max_mib)
        if total > max_mib * 2**20:
            biggest = sorted(wheels, key=lambda w: -w["bytes"])[:3]
            raise KitError(f"the kit would be {total / 2**20:.1f} MiB, over --max-mib {max_mib:g} (biggest: "
                           + ", ".join(f"{w['file']} {w['bytes'] / 2**20:.1f} MiB" for w in biggest)
                           + "); nothing was written")
        manifest = {"profile": profile_file.name, "python": python, "platform": "manylinux x86_64",
                    "built": time.strftime("%Y-%m-%d %H:%M"), "extras": extras, "bytes": total,
                    "wheels": wheels, "relies_on": resolver.relies_on(), "profile_conflicts": resolver.conflicts}
        (staging / "kit.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)  # an earlier kit: _check_out refused anything else
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _print_relies_on(manifest)
    print(f"\n{len(wheels)} wheels, {total / 2**20:.1f} MiB (limit {max_mib:g} MiB) in {out}, "
          f"{time.monotonic() - started:.0f} s. On the machine:\n"
          f"  python3 -m pip install --no-index --no-deps --target ~/tunesmith-site {out}/*.whl\n"
          f"  export PYTHONPATH=~/tunesmith-site; python3 -m app gpu")
    return manifest


def read_profile(path: Path) -> tuple[dict[str, str | None], str]:
    """{canonical name: version, or None where only the name is known}, and the `python==` line's version."""
    if not path.is_file():
        raise KitError(f"{path}: no such profile; give a file with one package a line (name==version)")
    have: dict[str, str | None] = {}
    python = ""
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        name, version = name.strip(), version.strip()
        try:
            Version(version) if version else None
            canonical = canonicalize_name(Requirement(name).name)
        except Exception:  # noqa: BLE001 - packaging raises several kinds; all mean the same line
            raise KitError(f"{path}:{number}: {raw.strip()!r} is not 'name' or 'name==version'") from None
        if canonical == "python":
            python = version
        else:
            have[canonical] = version or None
    return have, python


def project_requirements(extras: list[str]) -> list[str]:
    """pyproject's dependencies without the window's packages, and those of `extras`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise KitError(f"--extras {','.join(unknown)}: tunesmith has no such extra ({', '.join(optional)})")
    wanted = list(project["dependencies"]) + [r for e in extras for r in optional[e]]
    return [r for r in wanted if canonicalize_name(Requirement(r).name) not in GUI_ONLY]


def build_project_wheel(folder: Path) -> Path:
    """This checkout as a wheel (resources and presets inside), without its dependencies."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", tmp]
        done = subprocess.run(command + ["--no-build-isolation"], capture_output=True, text=True)
        if done.returncode != 0:  # no setuptools/wheel here: let pip fetch them for the build
            done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise KitError("building tunesmith's wheel failed: " + _last_line(done))
        [wheel] = Path(tmp).glob("tunesmith-*.whl")
        return Path(shutil.move(str(wheel), folder / wheel.name))


class Resolver:
    """Walks requirements from tunesmith down, stopping at what the profile has; each package that is
    missing is downloaded (pip picks the newest release for the target Python and platform) and its
    own requirements are followed. A release whose requirement the profile's known version does not
    meet is passed over for the one before it."""

    def __init__(self, have: dict[str, str | None], python: str, folder: Path):
        self.have, self.python, self.folder = have, python, folder
        self.environment = dict(default_environment(), python_version=".".join(python.split(".")[:2]),
                                python_full_version=python if python.count(".") == 2 else f"{python}.0",
                                sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
                                os_name="posix", implementation_name="cpython",
                                platform_python_implementation="CPython")
        self.chosen: dict[str, dict] = {}  # name -> {"version", "file", "requires", "extras"}
        self.specs: dict[str, SpecifierSet] = {}
        self.required_by: dict[str, set[str]] = {}
        self.uses: dict[str, set[str]] = {}  # profile package -> "parent spec" lines
        self.conflicts: list[str] = []

    def resolve(self, requirements: list[str]) -> None:
        queue = deque((Requirement(r), "tunesmith") for r in requirements)
        while queue:
            requirement, parent = queue.popleft()
            for follow in self._take(requirement, parent):
                queue.append(follow)

    def _take(self, requirement: Requirement, parent: str) -> list[tuple[Requirement, str]]:
        if requirement.marker and not any(requirement.marker.evaluate(dict(self.environment, extra=e))
                                          for e in self._parent_extras(parent)):
            return []
        name = canonicalize_name(requirement.name)
        if name in self.have:
            version = self.have[name]
            self.uses.setdefault(name, set()).add(f"{parent} {requirement.specifier or '(any)'}")
            if version and not requirement.specifier.contains(version, prereleases=True):
                self.conflicts.append(f"{parent} needs {name}{requirement.specifier}; the profile has {version}")
            return []
        if name.startswith(NEVER) or name in NEVER:
            raise KitError(f"{parent} needs {name}, which the profile lacks; a kit never carries torch or CUDA "
                           f"libraries: install {name} for the machine's CUDA there, and list it in the profile")
        self.specs[name] = self.specs.get(name, SpecifierSet()) & requirement.specifier
        self.required_by.setdefault(name, set()).add(parent)
        held = self.chosen.get(name)
        if held and self.specs[name].contains(held["version"], prereleases=True):
            if set(requirement.extras) <= held["extras"]:
                return []
            held["extras"] |= set(requirement.extras)  # the same release: follow what the new extras add
            return [(Requirement(r), name) for r in held["requires"]]
        if held:  # a later requirement excludes the release taken: take another
            (self.folder / held["file"]).unlink()
        chosen = self._download(name, self.specs[name])
        chosen["extras"] = (held["extras"] if held else set()) | set(requirement.extras)
        self.chosen[name] = chosen
        return [(Requirement(r), name) for r in chosen["requires"]]

    def _parent_extras(self, parent: str) -> list[str]:
        held = self.chosen.get(parent)
        return [""] + sorted(held["extras"]) if held else [""]

    def _download(self, name: str, spec: SpecifierSet) -> dict:
        passed_over: list[str] = []
        for _ in range(MAX_TRIES):
            wanted = name + str(SpecifierSet(",".join(filter(None, [str(spec)] + [f"!={v}" for v in passed_over]))))
            wheel = self._pip_download(wanted)
            meta = _wheel_metadata(wheel)
            version = meta["Version"]
            requires = meta.get_all("Requires-Dist") or []
            clash = self._clash(requires)
            if not clash:
                return {"version": version, "file": wheel.name, "requires": requires}
            print(f"  {name} {version} passed over: {clash}", flush=True)
            wheel.unlink()
            passed_over.append(version)
        raise KitError(f"no release of {name}{spec} among the newest {MAX_TRIES} fits the profile "
                       f"({', '.join(passed_over)} passed over); add a newer package to the profile's machine")

    def _clash(self, requires: list[str]) -> str:
        """The first requirement (unconditional for the target) that the profile's known version fails."""
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate(dict(self.environment, extra="")):
                continue
            have = self.have.get(canonicalize_name(requirement.name))
            if have and not requirement.specifier.contains(have, prereleases=True):
                return f"needs {requirement.name}{requirement.specifier}, the profile has {have}"
        return ""

    def _pip_download(self, wanted: str) -> Path:
        with tempfile.TemporaryDirectory(dir=self.folder) as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                       "--python-version", self.python, "--implementation", "cp",
                       "--abi", "cp" + "".join(self.python.split(".")[:2]), "-d", tmp, wanted]
            for platform in PLATFORMS:
                command += ["--platform", platform]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise KitError(f"no wheel of {wanted} for Python {self.python} on Linux x86-64: {_last_line(done)}")
            [wheel] = Path(tmp).glob("*.whl")
            return Path(shutil.move(str(wheel), self.folder / wheel.name))

    def wheels(self) -> list[dict]:
        return [{"name": name, "version": held["version"], "file": held["file"],
                 "required_by": sorted(self.required_by[name])} for name, held in sorted(self.chosen.items())]

    def relies_on(self) -> list[dict]:
        return [{"name": name, "profile_version": self.have[name] or "(version not in the profile)",
                 "needed_by": sorted(uses)} for name, uses in sorted(self.uses.items())]


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and (out / "kit.json").exists()):
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
            return
        raise KitError(f"{out} exists and is not an earlier kit (no kit.json in it); choose a new --out")


def _wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(archive.read(name).decode("utf-8"))


def _print_wheels(wheels: list[dict], total: int, max_mib: float) -> None:
    for wheel in sorted(wheels, key=lambda w: -w["bytes"]):
        print(f"  {wheel['name']:<20} {wheel['version']:<12} {wheel['bytes'] / 2**20:6.1f} MiB  "
              f"(for {', '.join(wheel['required_by'])})")


def _print_relies_on(manifest: dict) -> None:
    print("\nRelies on the machine's: " + ", ".join(
        f"{r['name']} {r['profile_version']}" if not r["profile_version"].startswith("(") else r["name"]
        for r in manifest["relies_on"]))
    for conflict in manifest["profile_conflicts"]:
        print(f"  note: {conflict} (pip's metadata disagrees; the import may still work)")


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()
             and "is ignored: it is neither a file nor a directory" not in line]
    return lines[-1].strip() if lines else f"exit code {done.returncode}"


if __name__ == "__main__":
    sys.exit(main())
