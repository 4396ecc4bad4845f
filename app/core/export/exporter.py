"""Export a run's adapter as the adapter, a merged model or a GGUF file (see the package's
docstring for the guarantees): `export_run` checks everything it can before writing, writes into a
staging folder and swaps it into place."""


from __future__ import annotations

import errno
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.core.adapters import AdapterSource, adapter_tokenizer, find_adapter
from app.core.atomic import write_json, write_text
from app.core.errors import ExportError, RunError
from app.core.export.card import model_card
from app.core.export.gguf import gguf_architecture, write_gguf
from app.core.export.gguf_check import verify_gguf
from app.core.export.merged_model import MERGE_INTO, merge_adapter, parameters
from app.core.export.modelfile import ollama_modelfile
from app.core.export.quantize import BYTES_PER_PARAM, BY_LLAMA_CPP, check_quant
from app.core.export.target import ExportLock, check_target, protected_reason, repair, staging, write_marker
from app.core.models.resolve import resolve_model
from app.core.portable import path_problem
from app.core.runs import slug
from app.core.units import size_text

FORMATS = ("adapter", "merged", "gguf")
DTYPES = ("auto", "bf16", "f16", "f32")  # auto: f16 where the activations allow (merged.choose_dtype)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
DISK_MARGIN = 1.1
# characters an export writes below --out: the staging folder's longer name (.NAME.xxxxxxxx.tmp) and
# the longest file in it, a GGUF named after its source (60) and quant
EXPORT_INNER = 96
@dataclass
class ExportResult:
    out_dir: Path
    format: str
    files: list[str]
    bytes: int
    checks: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ExportOptions:
    """How an export is written, beside what (the adapter) and where (`--out`)."""

    dtype: str = "auto"  # the merged weights' (DTYPES)
    quant: str = "f16"  # the GGUF's (quantize.ALL_QUANTS)
    force: bool = False  # replace an earlier export in the folder (target.check_target)
    trust_remote_code: bool = False
    pre_tokenizer: str = ""  # the GGUF's pre-tokenizer, named by hand
    merge_into: str = "trained"  # "trained" or "original" weights (merged_model.merge_adapter)
    download: bool = False  # a base model that is not on this machine may be downloaded


@dataclass(frozen=True)
class _Job:
    """One export being written: what, from which adapter and base, how."""

    fmt: str
    source: AdapterSource
    info: object  # the base's ModelFacts
    tokenizer: object
    options: ExportOptions
    progress: Callable[[str], None]


def export_run(ref: str, fmt: str, out: str | Path, options: ExportOptions = ExportOptions(),
               progress: Callable[[str], None] = lambda message: None) -> ExportResult:
    """Export the adapter `ref` names (a run, a checkpoint or an adapter folder) as `fmt` into `out`;
    everything that can be checked is checked before anything is written."""
    _check_options(fmt, options)
    problem = path_problem(Path(out).expanduser(), reserve=EXPORT_INNER)  # before resolve(): CON stays CON
    if problem:
        raise ExportError(f"--out: {problem}; choose another folder")
    out = Path(out).expanduser().resolve()
    source = find_adapter(ref)
    problem = protected_reason(out, [source.adapter_dir, source.run_dir])
    if problem:
        raise ExportError(problem)
    try:
        lock = ExportLock(out).acquire()
    except RunError as err:
        raise ExportError(str(err)) from None
    except OSError as err:
        raise ExportError(_write_failure(out, err)) from None
    try:
        for line in repair(out):
            progress(line)
        replace = check_target(out, options.force)
        info = _checked_base(source, out, fmt, options, progress)
        needed = _needed_bytes(fmt, source, parameters(info), options.dtype, options.quant)
        _check_space(out, needed)
        job = _Job(fmt, source, info, adapter_tokenizer(source, info, options.trust_remote_code), options, progress)
        files, size, checks = _write_staged(job, out, replace, needed)
    finally:
        lock.release()
    progress(f"Exported {fmt} to {out}")
    return ExportResult(out, fmt, files, size, checks)


def _check_options(fmt: str, options: ExportOptions) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}'; use one of {', '.join(FORMATS)}")
    if options.dtype not in DTYPES:
        raise ExportError(f"unknown --dtype '{options.dtype}'; use one of {', '.join(DTYPES)}")
    if options.merge_into not in MERGE_INTO:
        raise ExportError(f"unknown --merge-into '{options.merge_into}'; use one of {', '.join(MERGE_INTO)}")
    if fmt == "gguf":
        check_quant(options.quant)  # before anything loads: a K-quant without llama.cpp names the extra to install


def _checked_base(source: AdapterSource, out: Path, fmt: str, options: ExportOptions, progress):
    """The base model the adapter was trained on, resolved (downloaded only with `download`) and
    refused as an export target; for GGUF, an architecture the writer does not know is refused
    before the merge."""
    info = resolve_model(source.base, options.trust_remote_code, progress=progress, download=options.download)
    problem = protected_reason(out, [Path(info.path)])
    if problem:
        raise ExportError(problem)
    if fmt == "gguf":
        gguf_architecture(Path(info.path))
    return info


def _write_staged(job: _Job, out: Path, replace: bool, needed: int) -> tuple[list[str], int, dict]:
    """(the files, their bytes, the checks made) of the export, written into a staging folder and
    swapped into `out`; a full disk or any failure to write is one line, and nothing stays."""
    try:
        with staging(out, replace) as tmp:
            checks = _write(job, tmp)
            write_text(tmp / "README.md", model_card(job.source, job.info, job.fmt, job.options.dtype,
                                                     job.options.quant, checks))
            files = write_marker(tmp, {"format": job.fmt, "source": job.source.label, "base": job.info.name})
            size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    except OSError as err:
        raise ExportError(_write_failure(out, err, needed)) from None
    except Exception as err:  # noqa: BLE001 - safetensors' writer raises its own error for a full disk
        if "No space left on device" not in str(err):
            raise
        raise ExportError(_write_failure(out, OSError(errno.ENOSPC, "No space left on device"), needed)) from None
    return files, size, checks


def _write(job: _Job, tmp: Path) -> dict:
    """The export's own files, into the staging folder `tmp`; the checks made on them."""
    if job.fmt == "adapter":
        job.progress(f"Copying the adapter from {job.source.adapter_dir}")
        _write_adapter(job.source, job.tokenizer, tmp)
        return {}
    options = job.options
    if job.fmt == "merged":
        return merge_adapter(job.source, job.info, job.tokenizer, tmp, options.dtype, job.progress,
                             options.trust_remote_code, options.merge_into)
    return _write_gguf(job, tmp)


# -- the formats ------------------------------------------------------------------------------------
def _write_adapter(source: AdapterSource, tokenizer, out: Path) -> None:
    for name in ADAPTER_FILES:
        if not (source.adapter_dir / name).exists():
            raise ExportError(f"{source.adapter_dir}: no {name}; the adapter folder is incomplete")
        shutil.copy2(source.adapter_dir / name, out / name)
    tokenizer.save_pretrained(out)


def _write_gguf(job: _Job, out: Path) -> dict:
    """The merged model (temporary), the GGUF written from it and read back against it, its Modelfile."""
    options = job.options
    quant, pre_tokenizer = options.quant, options.pre_tokenizer
    merged = out / ".merged"
    merged.mkdir()
    # the merged weights are a step on the way: kept in the GGUF's own 16 bits (f16 for the quantised
    # types, whose quantizers start from f16), so that they are rounded once, not twice
    wide = quant if quant in ("f32", "bf16") else "f16"
    checks = merge_adapter(job.source, job.info, job.tokenizer, merged, wide, job.progress, options.trust_remote_code,
                           options.merge_into)
    name = f"{slug(job.source.label, 'model')}-{quant}.gguf"
    job.progress(f"Writing {name}")
    summary = write_gguf(merged, out / name, quant, lambda message, _fraction=None: job.progress(message),
                         pre_tokenizer)
    job.progress("Reading the GGUF file back to check it against the merged model")
    check = verify_gguf(out / name, merged)
    if not check.ok:
        raise ExportError(f"{name}: the written file does not match the merged model ({'; '.join(check.problems)})")
    write_text(out / "Modelfile", ollama_modelfile(name, job.tokenizer, _generation_config(merged)))
    shutil.rmtree(merged)
    write_json(out / "export.json", {"gguf": name, "quant": quant, "tensors": summary.tensor_count,
                                     "pre_tokenizer": summary.pre_tokenizer, "warnings": summary.warnings})
    extra = {"pre_tokenizer_by_hand": pre_tokenizer} if pre_tokenizer else {}
    return {**checks, "gguf_tensors": check.tensor_count, "gguf_max_abs_diff": check.max_abs_diff, **extra}


# -- helpers ----------------------------------------------------------------------------------------
def _generation_config(model_dir: Path) -> dict:
    """The model's generation_config.json (its end tokens and sampling defaults), {} without one."""
    import json

    try:
        config = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _needed_bytes(fmt: str, source: AdapterSource, params: int, dtype: str, quant: str) -> int:
    if fmt == "adapter":
        return sum(p.stat().st_size for p in source.adapter_dir.iterdir() if p.is_file()) + 50_000_000
    wide = quant if fmt == "gguf" else dtype  # the merged weights' precision (a GGUF merges at its own)
    merged = params * (4 if wide == "f32" else 2)
    if fmt == "merged":
        return merged
    wide = 2 * params if quant in BY_LLAMA_CPP else 0  # the 16-bit GGUF llama.cpp quantises from
    return merged + wide + int(params * BYTES_PER_PARAM[quant])  # the merged model is temporary


def _check_space(out: Path, needed: int) -> None:
    folder = out.parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed * DISK_MARGIN > free:
        raise ExportError(f"{folder}: {size_text(free)} free, but this export needs about "
                          f"{size_text(needed * DISK_MARGIN)}; free some space or choose another --out")


def _write_failure(out: Path, err: OSError, needed: int = 0) -> str:
    """One line for an export that could not be written; the staging folder is already removed. A
    short write (numpy's "8192 requested and 3440 written", the GGUF writer's) is a full disk too."""
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) or re.search(
            r"\d+ requested and \d+ written", str(err)):
        folder = out.parent if out.parent.exists() else Path(out.anchor)
        free = shutil.disk_usage(folder).free if folder.exists() else 0
        need = f", and this export needs about {size_text(needed * DISK_MARGIN)}" if needed else ""
        return (f"{folder}: the disk filled up while the export was written ({size_text(free)} free now{need}); "
                "nothing was kept. Free some space, or choose another --out, and export again")
    where = f" ({err.filename})" if err.filename else ""
    return (f"{out}: the export could not be written: {err.strerror or err}{where}; nothing was kept. "
            "Check that the folder is writable and export again")

