"""The model catalogue: config.json files (no weights) of popular models, so a plan can be made
before anything is downloaded, and the facts of whatever model the user names, without weights.

`resources/catalog/catalog.toml` lists each model's hub id, display name, config file and the
parameter count its Hugging Face page publishes (tests hold our counts to it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.core.errors import ModelError
from app.core.models.architecture import arch_facts
from app.core.models.facts import ModelFacts
from app.core.models.files import read_config
from app.core.resources import resources_dir
from app.core.toml import load_toml


@dataclass(frozen=True)
class CatalogEntry:
    """One catalogued model."""

    id: str
    name: str
    config_path: Path
    published_params: int

    def config(self) -> dict:
        return read_config(self.config_path)


def catalog() -> list[CatalogEntry]:
    folder = resources_dir() / "catalog"
    table = load_toml(folder / "catalog.toml")
    return [CatalogEntry(row["id"], row["name"], folder / row["config"], int(row["published_params"]))
            for row in table.get("model", [])]


def find_in_catalog(name: str) -> CatalogEntry | None:
    """The entry whose hub id, or the part after the '/', equals `name` (any case)."""
    wanted = name.strip().lower()
    for entry in catalog():
        if wanted in (entry.id.lower(), entry.id.split("/")[-1].lower()):
            return entry
    return None


def model_facts(source: str) -> ModelFacts:
    """Facts of the model named `source` from its config.json alone: a local folder or HF cache
    entry when there is one, else the catalogue. Nothing is downloaded and no weights are read."""
    from app.core.models import demo_model
    from app.core.models.resolve import HUB_ID, hf_cache_snapshot

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
