"""Where Tunesmith keeps things: runs, the converted demo model, settings.

Everything lives under the platform's user data/cache/config folders, or under
`$TUNESMITH_HOME` when that is set (tests and portable installs use it).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "tunesmith"


def _base(kind: str) -> Path:
    home = os.environ.get("TUNESMITH_HOME")
    if home:
        return Path(home).expanduser() / kind
    finder = {
        "data": platformdirs.user_data_path,
        "cache": platformdirs.user_cache_path,
        "config": platformdirs.user_config_path,
    }[kind]
    return Path(finder(APP_NAME, appauthor=False))


def data_dir() -> Path:
    """Root of user data (runs, recent models)."""
    return _base("data")


def runs_dir() -> Path:
    """One folder per training run."""
    return data_dir() / "runs"


def cache_dir() -> Path:
    """Re-creatable files, such as the converted demo model."""
    return _base("cache")


def config_dir() -> Path:
    """User settings and user-added presets."""
    return _base("config")


def recent_models_file() -> Path:
    """JSON list of model folders the user trained on recently."""
    return data_dir() / "recent_models.json"
