"""Ship `resources/` and `presets/` in the wheel, under `<prefix>/share/tunesmith/` where
`app.core.resources.shipped_dir` looks for them. Everything else is in pyproject.toml; this file
exists because pyproject's `data-files` cannot keep the folders' subfolders without listing each.
"""

from pathlib import Path

from setuptools import setup

SHIPPED = ("resources", "presets")


def data_files() -> list[tuple[str, list[str]]]:
    """(install folder, [files]) per folder of the shipped trees, subfolders kept."""
    by_folder: dict[str, list[str]] = {}
    for top in SHIPPED:
        for file in sorted(Path(top).rglob("*")):
            if file.is_file() and "__pycache__" not in file.parts:
                folder = f"share/tunesmith/{file.parent.as_posix()}"
                by_folder.setdefault(folder, []).append(file.as_posix())
    return sorted(by_folder.items())


setup(data_files=data_files())
