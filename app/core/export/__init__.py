"""Export a trained adapter: the adapter itself, a merged 16-bit model, or a GGUF file with an
Ollama Modelfile; each with a model card (README.md) saying what it is and how it was checked.

Here: the target folder's rules and the three formats. merged.py merges (tensor by tensor with
merge.py where the files allow) and checks the result; gguf.py writes GGUF and gguf_check.py reads
it back; modelfile.py writes Ollama's Modelfile; card.py the model card.

Every export is atomic: it is written into a staging sibling of `--out` and swapped into place
only when complete, so a failure or a full disk never leaves half a model behind (target.py: the
marker that lists what an export wrote, the swap, the repair of one a killed process left half
done, one export at a time per folder). An existing folder is replaced only with `force` and only
when it is empty or holds nothing but an earlier export's listed files, and never when it is (or
holds) the home folder, the current folder, Tunesmith's own folders, a run, the adapter or the base
model being exported, or lies inside a run. Free disk space and RAM are checked before anything is
written; a disk that fills up anyway, or any other failure to write, is one line, and nothing stays.
"""

from __future__ import annotations

import errno
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.core.atomic import write_json, write_text
from app.core.chat import AdapterSource, adapter_tokenizer, find_adapter
from app.core.errors import ExportError, RunError
from app.core.export.card import model_card
from app.core.export.merged import MERGE_INTO, merge_adapter, parameters
from app.core.export.modelfile import ollama_modelfile
from app.core.export.target import MARKER, ExportLock, check_target, repair, staging, write_marker
from app.core.portable import path_problem
from app.core.runs import is_run_folder, slug
from app.core.units import size_text

FORMATS = ("adapter", "merged", "gguf")
DTYPES = ("auto", "bf16", "f16", "f32")  # auto: f16 where the activations allow (merged.choose_dtype)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
DISK_MARGIN = 1.1
# characters an export writes below --out: the staging folder's longer name (.NAME.xxxxxxxx.tmp) and
# the longest file in it, a GGUF named after its source (60) and quant
EXPORT_INNER = 96
__all__ = ["MARKER", "ExportResult", "export_run", "protected_reason", "replace_problem"]


@dataclass
class ExportResult:
    out_dir: Path
    format: str
    files: list[str]
    bytes: int
    checks: dict = field(default_factory=dict)


def export_run(ref: str, fmt: str, out: str | Path, dtype: str = "auto", quant: str = "f16", force: bool = False,
               progress: Callable[[str], None] = lambda message: None,
               trust_remote_code: bool = False, pre_tokenizer: str = "", merge_into: str = "trained",
               download: bool = False) -> ExportResult:
    """Export the adapter `ref` names (a run, a checkpoint or an adapter folder) as `fmt` into `out`;
    `merge_into` "trained" or "original" (merged.merge_adapter) for the merged and GGUF formats; a
    base model that is not on this machine is downloaded only with `download`."""
    from app.core.models.resolve import resolve_model

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}'; use one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown --dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    if merge_into not in MERGE_INTO:
        raise ExportError(f"unknown --merge-into '{merge_into}'; use one of {', '.join(MERGE_INTO)}")
    if fmt == "gguf":
        from app.core.export.quantize import check_quant

        check_quant(quant)  # before anything loads: a K-quant without llama.cpp names the extra to install
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
        replace = check_target(out, force)
        info = resolve_model(source.base, trust_remote_code, progress=progress, download=download)
        problem = protected_reason(out, [Path(info.path)])
        if problem:
            raise ExportError(problem)
        if fmt == "gguf":
            from app.core.export.gguf import gguf_architecture

            gguf_architecture(Path(info.path))  # an architecture the writer does not know is refused before the merge
        needed = _needed_bytes(fmt, source, parameters(info), dtype, quant)
        _check_space(out, needed)
        tokenizer = adapter_tokenizer(source, info, trust_remote_code)
        try:
            with staging(out, replace) as tmp:
                checks = _write(fmt, source, info, tokenizer, tmp, dtype, quant, progress, trust_remote_code,
                                pre_tokenizer, merge_into)
                write_text(tmp / "README.md", model_card(source, info, fmt, dtype, quant, checks))
                files = write_marker(tmp, {"format": fmt, "source": source.label, "base": info.name})
                size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        except OSError as err:
            raise ExportError(_write_failure(out, err, needed)) from None
        except Exception as err:  # noqa: BLE001 - safetensors' writer raises its own error for a full disk
            if "No space left on device" not in str(err):
                raise
            raise ExportError(_write_failure(out, OSError(errno.ENOSPC, "No space left on device"), needed)) from None
    finally:
        lock.release()
    progress(f"Exported {fmt} to {out}")
    return ExportResult(out, fmt, files, size, checks)


def _write(fmt: str, source: AdapterSource, info, tokenizer, tmp: Path, dtype: str, quant: str, progress,
           trust_remote_code: bool, pre_tokenizer: str, merge_into: str) -> dict:
    """The export's own files, into the staging folder `tmp`; the checks made on them."""
    if fmt == "adapter":
        progress(f"Copying the adapter from {source.adapter_dir}")
        _write_adapter(source, tokenizer, tmp)
        return {}
    if fmt == "merged":
        return merge_adapter(source, info, tokenizer, tmp, dtype, progress, trust_remote_code, merge_into)
    return _write_gguf(source, info, tokenizer, tmp, quant, progress, trust_remote_code, pre_tokenizer, merge_into)


# -- the formats ------------------------------------------------------------------------------------
def _write_adapter(source: AdapterSource, tokenizer, out: Path) -> None:
    for name in ADAPTER_FILES:
        if not (source.adapter_dir / name).exists():
            raise ExportError(f"{source.adapter_dir}: no {name}; the adapter folder is incomplete")
        shutil.copy2(source.adapter_dir / name, out / name)
    tokenizer.save_pretrained(out)


def _write_gguf(source: AdapterSource, info, tokenizer, out: Path, quant: str, progress,
                trust_remote_code: bool, pre_tokenizer: str = "", merge_into: str = "trained") -> dict:
    from app.core.export.gguf import write_gguf
    from app.core.export.gguf_check import verify_gguf

    merged = out / ".merged"
    merged.mkdir()
    # the merged weights are a step on the way: kept in the GGUF's own 16 bits (f16 for the quantised
    # types, whose quantizers start from f16), so that they are rounded once, not twice
    wide = quant if quant in ("f32", "bf16") else "f16"
    checks = merge_adapter(source, info, tokenizer, merged, wide, progress, trust_remote_code, merge_into)
    name = f"{slug(source.label, 'model')}-{quant}.gguf"
    progress(f"Writing {name}")
    summary = write_gguf(merged, out / name, quant, lambda message, _fraction=None: progress(message),
                         pre_tokenizer)
    progress("Reading the GGUF file back to check it against the merged model")
    check = verify_gguf(out / name, merged)
    if not check.ok:
        raise ExportError(f"{name}: the written file does not match the merged model ({'; '.join(check.problems)})")
    write_text(out / "Modelfile", ollama_modelfile(name, tokenizer, _generation_config(merged)))
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


def protected_reason(out: Path, also: list[Path | None] = ()) -> str:
    """Why `out` must never be replaced by an export ("" when it may be): it is, or contains, the
    home folder, the current folder, one of Tunesmith's folders, a run, or a path in `also`
    (the adapter and base model being exported)."""
    from app.core.paths import cache_dir, config_dir, data_dir, runs_dir

    out = Path(out).expanduser().resolve()
    named = [(Path.home(), "your home folder"), (Path.cwd(), "the current folder"),
             (data_dir(), "Tunesmith's data folder"), (runs_dir(), "Tunesmith's run store"),
             (cache_dir(), "Tunesmith's cache"), (config_dir(), "Tunesmith's settings folder")]
    named += [(path, "what is being exported") for path in also if path is not None]
    for path, what in named:
        path = Path(path).expanduser().resolve()
        if out == path or out in path.parents:
            return (f"{out}: refused: {'it is' if out == path else 'it contains'} {what} ({path}); an export "
                    "never replaces that. Choose a new folder for --out")
    if out.parent == Path(runs_dir()).resolve() or is_run_folder(out) or out == Path(out.anchor):
        return f"{out}: refused: it is a run folder or a drive's root; choose a new folder for --out"
    run = next((p for p in out.parents if is_run_folder(p)), None)
    if run is not None:
        return (f"{out}: refused: it is inside the run {run.name} ({run}), whose folder holds the run's own "
                "files; choose a folder outside it for --out")
    return ""


def replace_problem(out: Path, ref: str) -> str:
    """For a window about to ask "replace?": why `out` cannot be replaced by exporting `ref`, or ""."""
    try:
        source = find_adapter(ref)
        problem = protected_reason(out, [source.adapter_dir, source.run_dir])
        if not problem:
            check_target(Path(out).expanduser().resolve(), True)
    except ExportError as err:
        return str(err)
    except Exception:  # noqa: BLE001 - the export itself reports anything else, in full
        return ""
    return problem


def _needed_bytes(fmt: str, source: AdapterSource, params: int, dtype: str, quant: str) -> int:
    if fmt == "adapter":
        return sum(p.stat().st_size for p in source.adapter_dir.iterdir() if p.is_file()) + 50_000_000
    wide = quant if fmt == "gguf" else dtype  # the merged weights' precision (a GGUF merges at its own)
    merged = params * (4 if wide == "f32" else 2)
    if fmt == "merged":
        return merged
    from app.core.export.quantize import BY_LLAMA_CPP, BYTES_PER_PARAM

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

