"""Icons from `resources/icons/` (SVG, so they stay sharp at any scale)."""

from __future__ import annotations

from functools import cache

from PySide6.QtGui import QIcon

from app.core.resources import resources_dir


@cache
def icon(name: str) -> QIcon:
    """`resources/icons/<name>.svg`, or an empty icon when it is missing (a button shows its text)."""
    path = resources_dir() / "icons" / f"{name}.svg"
    return QIcon(str(path)) if path.exists() else QIcon()


def app_icon() -> QIcon:
    return icon("tunesmith")
