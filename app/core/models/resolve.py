"""Resolve what the user names as a model and list the models they have (loading is in load.py).

A model is named by a local folder, an entry of the Hugging Face cache ("org/name"), a hub id
(downloaded on request), or "demo". Every folder is checked by `files.inspect_folder`
before anything loads from it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

from app.core.atomic import write_json
from app.core.errors import ModelError
from app.core.models import demo_model
from app.core.models.architecture import arch_facts
from app.core.models.catalog import CatalogEntry, catalog, find_in_catalog
from app.core.models.facts import ModelFacts, arch_or_none
from app.core.models.files import inspect_folder, read_config
from app.core.paths import recent_models_file
from app.core.units import size_text

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
RECENT_LIMIT = 10


def resolve_model(source: str, trust_remote_code: bool = False, allow_pickle: bool = False,
                  progress: Callable[[str], None] = lambda message: None, download: bool = True) -> ModelFacts:
    """Find and check the model named `source`; download a hub id that is not cached, only with
    `download` (else ModelError saying how large it is and how to agree: the base an adapter or a
    copied run names is not a model the user asked for)."""
    source = (source or "demo").strip()
    if source.lower() == "demo":
        path = demo_model.ensure_demo_model(progress)
        return replace(inspect_folder(path), name=demo_model.DEMO_NAME, kind="demo", source=source)
    local = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
    if local.exists() or looks_local:
        if not local.exists():
            raise ModelError(f"{source}: no such folder")
        return _named(inspect_folder(local.resolve(), trust_remote_code, allow_pickle), "folder", source)
    if not HUB_ID.match(source):
        raise ModelError(f"{source}: no such folder, and not a hub id like 'org/name'; "
                         "give a model folder, a hub id or 'demo'")
    cached = hf_cache_snapshot(source)
    if cached is not None:
        return _named(inspect_folder(cached, trust_remote_code, allow_pickle), "hf-cache", source)
    if not download:
        size = hub_download_size(source)
        how_big = f"{size_text(size)} to download" if size else "its size could not be read from the Hub"
        raise ModelError(f"{source}: the base model is not on this machine ({how_big}); pass --download to "
                         "download it from the Hugging Face Hub, or copy it into the Hugging Face cache")
    path = download_model(source, progress)
    return _named(inspect_folder(path, trust_remote_code, allow_pickle), "hub", source)


def _named(facts: ModelFacts, kind: str, source: str) -> ModelFacts:
    """`facts` as named by the user: `source`'s last part is the name (a hub id's model name)."""
    return replace(facts, name=source.rstrip("/").split("/")[-1], kind=kind, source=source)


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of `repo_id` in the Hugging Face cache, if it has one."""
    entry = _hf_cache_root() / ("models--" + repo_id.replace("/", "--"))
    snapshots = entry / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = entry / "refs" / "main"
    if ref.exists():
        snapshot = snapshots / ref.read_text(encoding="utf-8").strip()
        if snapshot.is_dir():
            return snapshot
    candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return candidates[0] if candidates else None


def is_missing_hub_model(source: str) -> bool:
    """Whether `source` is a hub id with no copy on this machine (resolving it would download)."""
    source = (source or "").strip()
    if source.lower() == "demo" or not HUB_ID.match(source) or Path(source).expanduser().exists():
        return False
    return hf_cache_snapshot(source) is None


def hub_download_size(repo_id: str, timeout: float = 10.0) -> int | None:
    """Bytes `download_model` would fetch for `repo_id` (the Hub's file list), or None offline."""
    import fnmatch

    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo_id, files_metadata=True, timeout=timeout)
    except Exception:  # noqa: BLE001 - offline, unknown or gated: the size is simply not known
        return None
    return sum(f.size or 0 for f in info.siblings or []
               if any(fnmatch.fnmatch(f.rfilename.split("/")[-1], pattern) for pattern in DOWNLOAD_PATTERNS)) or None


def download_model(repo_id: str, progress: Callable[[str], None]) -> Path:
    """Download the safetensors, config and tokenizer files of a hub model (with progress bars)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()  # a download of gigabytes shows its own bars, whatever quiet_loading did

    progress(f"Downloading {repo_id} from the Hugging Face Hub...")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS, cache_dir=_hf_cache_root()))
    except Exception as err:  # network, auth and not-found errors come in many types
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ModelError(f"{repo_id}: could not download from the Hugging Face Hub ({reason}); check the "
                         "network and the name, or give a local model folder") from None


def list_models() -> list[ModelFacts]:
    """The demo model, causal LMs in the Hugging Face cache, and recently used folders."""
    rows = [_demo_row()]
    root = _hf_cache_root()
    if root.is_dir():
        for entry in sorted(root.glob("models--*")):
            repo_id = entry.name[len("models--"):].replace("--", "/")
            snapshot = hf_cache_snapshot(repo_id)
            row = snapshot and _listed(repo_id, "hf-cache", snapshot)
            if row:
                rows.append(row)
    for folder in recent_models():
        row = _listed(folder, "recent", Path(folder))
        if row:
            rows.append(row)
    return rows


def _listed(name: str, kind: str, path: Path) -> ModelFacts | None:
    try:
        facts = inspect_folder(path, trust_remote_code=True, allow_pickle=True)
    except ModelError:
        return None
    return replace(facts, name=name, kind=kind, source=name)


def model_facts(source: str) -> ModelFacts:
    """Facts of the model named `source` from its config.json alone: a local folder or HF cache
    entry when there is one, else the catalogue. Nothing is downloaded and no weights are read."""
    source = (source or "demo").strip()
    if source.lower() == "demo":
        if demo_model.is_converted():
            return _from_folder(demo_model.DEMO_NAME, "demo", demo_model.demo_model_dir())
        return _from_entry(find_in_catalog(demo_model.DEMO_REPO), demo_model.DEMO_NAME, "demo", source)
    local = Path(source).expanduser()
    if local.is_dir():
        return _from_folder(source, "folder", local)
    if HUB_ID.match(source):
        snapshot = hf_cache_snapshot(source)
        if snapshot is not None and (snapshot / "config.json").exists():
            return _from_folder(source, "hf-cache", snapshot)
    entry = find_in_catalog(source)
    if entry is not None:
        return _from_entry(entry, entry.id, "catalogue", source)
    known = ", ".join(e.id.split("/")[-1] for e in catalog())
    raise ModelError(f"{source}: not a model folder, not in the Hugging Face cache and not in the "
                     f"catalogue; download it first, or plan with a catalogued model ({known})")


def _from_entry(entry: CatalogEntry, name: str, kind: str, source: str) -> ModelFacts:
    config = entry.config()
    return ModelFacts(name, kind, source, None, entry.config_path, config, arch_facts(config))


def _from_folder(name: str, kind: str, folder: Path) -> ModelFacts:
    config = read_config(folder)
    try:
        arch = arch_facts(config)
    except (KeyError, ValueError, TypeError, ZeroDivisionError) as err:
        raise ModelError(f"{folder / 'config.json'}: cannot read the architecture ({err!s} missing or "
                         "invalid); is this a decoder-only causal LM?") from None
    return ModelFacts(name, kind, name, folder, folder / "config.json", config, arch)


def _demo_row() -> ModelFacts:
    path = demo_model.demo_model_dir()
    if demo_model.is_converted():
        return replace(inspect_folder(path), name="demo", kind="demo", source="demo")
    config_path = find_in_catalog(demo_model.DEMO_REPO).config_path
    config = read_config(config_path)
    return ModelFacts("demo", "demo (converted on first use)", "demo", path, config_path, config,
                      arch_or_none(config), parameters=134_515_008)


def _hf_cache_root() -> Path:
    """The Hugging Face hub cache; HF_HUB_CACHE is read now, not when huggingface_hub was imported."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def recent_models() -> list[str]:
    file = recent_models_file()
    try:
        items = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    return [p for p in items if isinstance(p, str) and Path(p).is_dir()]


def remember_model(info: ModelFacts) -> None:
    """Put a local folder at the top of the recent list (the demo and cache entries list themselves)."""
    if info.kind != "folder":
        return
    items = [str(info.path)] + [p for p in recent_models() if p != str(info.path)]
    write_json(recent_models_file(), items[:RECENT_LIMIT])
