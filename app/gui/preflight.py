"""Before Qt starts on Linux: can the window open here? If not, one line that says how to fix it.

Qt's own failure when its X11 libraries are missing is an abort with a core dump and the advice
"Reinstalling the application may fix this problem", which is wrong: the system lacks a few
shared libraries that pip cannot install. So before the first Qt import the launcher asks
`display_problem()`: it reads which shared libraries the Qt widgets and the chosen platform
plugin need (the ELF files' DT_NEEDED entries, so the list follows PySide6 upgrades), tries
to load each one that PySide6 does not bundle, and names the distribution's packages for any
that are missing. On a Wayland session whose plugin loads it asks Qt for Wayland first.

Qt-free on purpose: it runs before Qt is imported, and must work when Qt cannot load.
"""

from __future__ import annotations

import ctypes
import importlib.util
import mmap
import os
import struct
import sys
from collections.abc import Callable, MutableMapping
from pathlib import Path

# soname -> package for (apt, dnf, pacman, zypper): what PySide6 6.x's widgets and its xcb and
# wayland plugins load from the system. A soname not listed here is named as it is.
PACKAGES: dict[str, tuple[str, str, str, str]] = {
    "libGL.so.1": ("libgl1", "libglvnd-glx", "libglvnd", "libGL1"),
    "libEGL.so.1": ("libegl1", "libglvnd-egl", "libglvnd", "libEGL1"),
    "libOpenGL.so.0": ("libopengl0", "libglvnd-opengl", "libglvnd", "libOpenGL0"),
    "libfontconfig.so.1": ("libfontconfig1", "fontconfig", "fontconfig", "libfontconfig1"),
    "libfreetype.so.6": ("libfreetype6", "freetype", "freetype2", "libfreetype6"),
    "libdbus-1.so.3": ("libdbus-1-3", "dbus-libs", "dbus", "libdbus-1-3"),
    "libglib-2.0.so.0": ("libglib2.0-0", "glib2", "glib2", "libglib-2_0-0"),
    "libgthread-2.0.so.0": ("libglib2.0-0", "glib2", "glib2", "libgthread-2_0-0"),
    "libxkbcommon.so.0": ("libxkbcommon0", "libxkbcommon", "libxkbcommon", "libxkbcommon0"),
    "libxkbcommon-x11.so.0": ("libxkbcommon-x11-0", "libxkbcommon-x11", "libxkbcommon-x11", "libxkbcommon-x11-0"),
    "libX11.so.6": ("libx11-6", "libX11", "libx11", "libX11-6"),
    "libX11-xcb.so.1": ("libx11-xcb1", "libX11-xcb", "libx11", "libX11-xcb1"),
    "libxcb.so.1": ("libxcb1", "libxcb", "libxcb", "libxcb1"),
    "libxcb-cursor.so.0": ("libxcb-cursor0", "xcb-util-cursor", "xcb-util-cursor", "libxcb-cursor0"),
    "libxcb-icccm.so.4": ("libxcb-icccm4", "xcb-util-wm", "xcb-util-wm", "libxcb-icccm4"),
    "libxcb-image.so.0": ("libxcb-image0", "xcb-util-image", "xcb-util-image", "libxcb-image0"),
    "libxcb-keysyms.so.1": ("libxcb-keysyms1", "xcb-util-keysyms", "xcb-util-keysyms", "libxcb-keysyms1"),
    "libxcb-render-util.so.0": ("libxcb-render-util0", "xcb-util-renderutil", "xcb-util-renderutil",
                                "libxcb-render-util0"),
    "libxcb-util.so.1": ("libxcb-util1", "xcb-util", "xcb-util", "libxcb-util1"),
    "libwayland-client.so.0": ("libwayland-client0", "libwayland-client", "wayland", "libwayland-client0"),
    "libwayland-cursor.so.0": ("libwayland-cursor0", "libwayland-cursor", "wayland", "libwayland-cursor0"),
    "libwayland-egl.so.1": ("libwayland-egl1", "libwayland-egl", "wayland", "libwayland-egl1"),
}
# The rest of xcb's own extensions (libxcb-randr.so.0, libxcb-shm.so.0, ...) come in one package
# on Fedora and Arch, and in one per extension, named after it, on Debian and openSUSE.
_XCB_EXTENSION = ("{deb}", "libxcb", "libxcb", "{deb}")

FAMILIES = ("apt", "dnf", "pacman", "zypper")
INSTALL = {"apt": "sudo apt install", "dnf": "sudo dnf install", "pacman": "sudo pacman -S --needed",
           "zypper": "sudo zypper install"}
# /etc/os-release ID or ID_LIKE word -> family
_FAMILY_OF = {"debian": "apt", "ubuntu": "apt", "linuxmint": "apt", "pop": "apt", "raspbian": "apt",
              "fedora": "dnf", "rhel": "dnf", "centos": "dnf", "rocky": "dnf", "almalinux": "dnf",
              "arch": "pacman", "manjaro": "pacman", "endeavouros": "pacman",
              "suse": "zypper", "opensuse": "zypper", "sles": "zypper"}


def package_for(soname: str, family: str | None) -> str:
    """The package that provides `soname` on `family`'s distributions (the soname itself if unknown)."""
    if family not in FAMILIES:
        return soname
    row = PACKAGES.get(soname)
    if row is None and soname.startswith("libxcb-") and ".so." in soname:
        stem, _, major = soname[len("lib"):].partition(".so.")
        row = tuple(name.format(deb=f"lib{stem}{major}") for name in _XCB_EXTENSION)
    return row[FAMILIES.index(family)] if row else soname


def family_of(os_release: str) -> str | None:
    """The package family (apt, dnf, pacman, zypper) from /etc/os-release's ID and ID_LIKE."""
    words: list[str] = []
    for line in os_release.splitlines():
        key, _, value = line.partition("=")
        if key.strip() in ("ID", "ID_LIKE"):
            words += value.strip().strip("\"'").lower().split()
    for word in words:
        for prefix, family in _FAMILY_OF.items():
            if word == prefix or word.startswith(prefix + "-"):  # opensuse-tumbleweed, opensuse-leap
                return family
    return None


def elf_needed(path: Path) -> list[str]:
    """The DT_NEEDED sonames of a 64-bit little-endian ELF file ([] for anything else)."""
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as elf:
        if elf[:6] != b"\x7fELF\x02\x01":
            return []
        shoff, = struct.unpack_from("<Q", elf, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
        sections = [struct.unpack_from("<IIQQQQI", elf, shoff + i * shentsize) for i in range(shnum)]
        for _name, kind, _flags, _addr, offset, size, link in sections:
            if kind != 6:  # SHT_DYNAMIC; its sh_link is the string table's section
                continue
            strings = sections[link][4]
            names = []
            for at in range(offset, offset + size, 16):
                tag, value = struct.unpack_from("<qQ", elf, at)
                if tag == 0:
                    break
                if tag == 1:  # DT_NEEDED
                    start = strings + value
                    names.append(elf[start:elf.find(b"\0", start)].decode())
            return names
    return []


def _pyside_dir() -> Path | None:
    spec = importlib.util.find_spec("PySide6")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def system_libraries(files: list[Path], bundled: list[Path]) -> list[str]:
    """The sonames that `files` need, through the libraries PySide6 bundles, from the system."""
    seen: set[str] = set()
    outside: list[str] = []
    todo = list(files)
    while todo:
        for name in elf_needed(todo.pop()):
            if name in seen:
                continue
            seen.add(name)
            found = next((d / name for d in bundled if (d / name).exists()), None)
            if found is not None:
                todo.append(found)
            else:
                outside.append(name)
    return outside


def loads(soname: str) -> bool:
    """Whether the dynamic loader finds `soname` and everything it needs (as Qt's dlopen would)."""
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def missing_for(plugin: str, loader: Callable[[str], bool] | None = None) -> list[str] | None:
    """The system libraries that the widgets and platform `plugin` need and that do not load
    (None when PySide6's files are not where a pip install puts them: then nothing is checked)."""
    pyside = _pyside_dir()
    if pyside is None:
        return None
    qt_lib = pyside / "Qt" / "lib"
    plugin_file = pyside / "Qt" / "plugins" / "platforms" / f"libq{plugin}.so"
    widgets = next(pyside.glob("QtWidgets*.so"), None)
    if widgets is None or not plugin_file.exists() or not qt_lib.is_dir():
        return None
    bundled = [qt_lib, pyside, pyside.parent / "shiboken6"]
    if getattr(sys, "frozen", False):  # PyInstaller puts the libraries it bundles beside the app
        bundled.append(Path(getattr(sys, "_MEIPASS", pyside.parent)))
    try:
        needed = system_libraries([widgets, plugin_file], bundled)
    except (OSError, ValueError, struct.error):
        return None
    return [name for name in needed if not (loader or loads)(name)]


FALLBACK = "; or use the command line (tunesmith --help)"


def _install_line(what: str, missing: list[str], os_release: str | None) -> str:
    """The line for missing libraries, with the install command of the distribution that
    `os_release` (/etc/os-release's text; read here when None) names."""
    if os_release is None:
        try:
            os_release = Path("/etc/os-release").read_text(encoding="utf-8", errors="replace")
        except OSError:
            os_release = ""
    family = family_of(os_release)
    libraries = ", ".join(missing)
    if family is None:
        fix = "install the packages of your distribution that provide them"
    else:
        packages = " ".join(dict.fromkeys(package_for(name, family) for name in missing))
        fix = f"install them with: {INSTALL[family]} {packages}"
    return f"tunesmith: the window needs {what} libraries that are missing ({libraries}); {fix}{FALLBACK}"


def display_problem(env: MutableMapping[str, str] | None = None, os_release: str | None = None,
                    loader: Callable[[str], bool] | None = None, platform: str = sys.platform) -> str | None:
    """None when Qt's window can start; else the one line to print. May set QT_QPA_PLATFORM in `env`
    (os.environ by default) to prefer Wayland on a Wayland session whose plugin loads.
    `os_release`: /etc/os-release's text, read only when there is a line to write."""
    if not platform.startswith("linux"):
        return None
    env = os.environ if env is None else env
    chosen = env.get("QT_QPA_PLATFORM", "").split(";")[0].split(":")[0].strip().lower()
    if chosen and chosen != "xcb" and not chosen.startswith("wayland"):
        return None  # offscreen, vnc, eglfs, ...: the user chose a platform that needs no desktop
    wayland, x11 = bool(env.get("WAYLAND_DISPLAY")), bool(env.get("DISPLAY"))
    if chosen.startswith("wayland") or (not chosen and wayland):
        missing = missing_for("wayland", loader)
        if not missing:  # it loads (or cannot be checked): let Qt try Wayland, X11 after it
            if not chosen:
                env["QT_QPA_PLATFORM"] = "wayland;xcb" if x11 else "wayland"
            return None
        if chosen or not x11:
            return _install_line("Wayland", missing, os_release)
    if not x11:
        return ("tunesmith: there is no display to open the window on (neither DISPLAY nor "
                "WAYLAND_DISPLAY is set); start it from your desktop session, or as "
                "`xvfb-run tunesmith` on a machine without one" + FALLBACK)
    missing = missing_for("xcb", loader)
    return _install_line("X11", missing, os_release) if missing else None


def check() -> int:
    """Print the problem, if any, to stderr; the exit status for the launcher (0: go on, 2: stop).
    Started without a terminal (a desktop menu, a file manager), it is also sent as a desktop
    notification where `notify-send` exists, since no one would read stderr."""
    problem = display_problem()
    if problem is None:
        return 0
    print(problem, file=sys.stderr, flush=True)
    if not (sys.stderr is not None and sys.stderr.isatty()):
        _notify(problem)
    return 2


def _notify(problem: str) -> None:
    import shutil
    import subprocess

    notify = shutil.which("notify-send")
    if notify is None:
        return
    try:
        subprocess.run([notify, "--app-name=Tunesmith", "Tunesmith cannot open its window",
                        problem.removeprefix("tunesmith: ")], timeout=5, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        pass
