"""Read TOML files (presets, the catalogue) with errors that name the file and what is wrong."""

from __future__ import annotations

import sys
from pathlib import Path

from app.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def load_toml(path: Path) -> dict:
    """The parsed file; ConfigError with file, line and the fix when it is not valid TOML."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read ({err.__class__.__name__}: {err})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err}); fix the line or delete the file") from None
