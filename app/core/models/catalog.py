"""The model catalogue: config.json files (no weights) of popular models, so a plan can be made
before anything is downloaded (resolve.model_facts reads a named model's facts from here when it is
not on this machine).

`resources/catalog/catalog.toml` lists each model's hub id, display name, config file and the
parameter count its Hugging Face page publishes (tests hold our counts to it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
