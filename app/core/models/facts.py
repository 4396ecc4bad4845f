"""The one record of a model, whatever named it: a folder, a cache entry, a hub download, the
catalogue or the demo. Made by `files.inspect_folder` (from the folder's files),
`resolve.resolve_model` (which says where it came from) and `resolve.model_facts` (config only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from app.core.models.architecture import ArchFacts, arch_facts


@dataclass
class ModelFacts:
    """A model: what it is called, where it is, its architecture and, for a folder, its files."""

    name: str  # what the user sees: the folder name, the hub id, the catalogue id, "SmolLM2-135M-Instruct"
    kind: str  # "demo", "folder", "hf-cache", "hub", "catalogue" or "recent"
    source: str  # what the user named it by (a path, an "org/name", "demo")
    path: Path | None  # the model folder; None for a catalogue entry, which has only a config
    config_path: Path
    config: dict
    arch: ArchFacts | None  # None for a layout the estimator does not know
    weights: list[Path] = field(default_factory=list)
    parameters: int | None = None  # counted from the safetensors headers; None when not counted
    size_bytes: int = 0
    pickle_weights: bool = False
    needs_remote_code: bool = False

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type") or "")

    @property
    def architecture(self) -> str:
        """The class names config.json declares, or the model type when it declares none."""
        return ", ".join(self.config.get("architectures") or []) or self.model_type


def arch_or_none(config: dict) -> ArchFacts | None:
    """Architecture facts of `config`, or None for a layout the estimator does not know."""
    try:
        return arch_facts(config)
    except (KeyError, ValueError, TypeError, ZeroDivisionError):
        return None
