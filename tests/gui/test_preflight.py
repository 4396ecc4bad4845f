"""The check before Qt starts: one line naming the packages to install, never Qt's own abort.

A missing library is hidden from the check by its `loader` (the machine running the tests may
have every library, or not); the ELF reading and the library list are the real PySide6 files.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.gui import preflight
from conftest import REPO

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the check is Linux's")

DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n'
UBUNTU = "ID=ubuntu\nID_LIKE=debian\n"
FEDORA = 'ID=fedora\nVERSION_ID=41\n'
ARCH = "ID=arch\n"
TUMBLEWEED = 'ID="opensuse-tumbleweed"\nID_LIKE="opensuse suse"\n'
HIDDEN = {"libxcb-icccm.so.4", "libxcb-cursor.so.0", "libxcb-randr.so.0"}


def hide(*names: str):
    return lambda soname: soname not in set(names)


def everything(soname: str) -> bool:
    return True


def test_the_plugins_needs_are_read_from_its_elf_file():
    needed = preflight.missing_for("xcb", loader=lambda soname: False)  # nothing loads: all are listed
    assert needed is not None, "PySide6's xcb plugin was not found where pip puts it"
    for soname in ("libxcb-icccm.so.4", "libxcb-cursor.so.0", "libxkbcommon-x11.so.0", "libxcb.so.1"):
        assert soname in needed
    assert not any(name.startswith("libQt6") for name in needed), "bundled Qt libraries are not the system's"
    assert "libwayland-client.so.0" in preflight.missing_for("wayland", loader=lambda soname: False)


@pytest.mark.parametrize("os_release, command, packages", [
    (DEBIAN, "sudo apt install", "libxcb-icccm4 libxcb-cursor0 libxcb-randr0"),
    (UBUNTU, "sudo apt install", "libxcb-icccm4 libxcb-cursor0 libxcb-randr0"),
    (FEDORA, "sudo dnf install", "xcb-util-wm xcb-util-cursor libxcb"),
    (ARCH, "sudo pacman -S --needed", "xcb-util-wm xcb-util-cursor libxcb"),
    (TUMBLEWEED, "sudo zypper install", "libxcb-icccm4 libxcb-cursor0 libxcb-randr0"),
])
def test_a_missing_x11_library_gets_the_distributions_install_command(os_release, command, packages):
    line = preflight.display_problem({"DISPLAY": ":0"}, os_release, loader=hide(*HIDDEN))
    assert line is not None and "\n" not in line
    assert line.startswith("tunesmith: the window needs X11 libraries that are missing (")
    for soname in HIDDEN:
        assert soname in line
    install = line.split("install them with: ", 1)[1].split(";")[0]
    assert install.startswith(command + " ")
    assert sorted(install[len(command):].split()) == sorted(packages.split())


def test_an_unknown_distribution_gets_the_library_names():
    line = preflight.display_problem({"DISPLAY": ":0"}, "ID=nixos\n", loader=hide("libxcb-keysyms.so.1"))
    assert "libxcb-keysyms.so.1" in line and "sudo" not in line
    assert "packages of your distribution that provide them" in line


def test_nothing_missing_means_no_message_and_no_change():
    env = {"DISPLAY": ":0"}
    assert preflight.display_problem(env, DEBIAN, loader=everything) is None
    assert env == {"DISPLAY": ":0"}


def test_a_wayland_session_prefers_wayland_when_its_plugin_loads():
    env = {"DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0"}
    assert preflight.display_problem(env, DEBIAN, loader=everything) is None
    assert env["QT_QPA_PLATFORM"] == "wayland;xcb"
    pure = {"WAYLAND_DISPLAY": "wayland-0"}
    assert preflight.display_problem(pure, DEBIAN, loader=everything) is None
    assert pure["QT_QPA_PLATFORM"] == "wayland"


def test_a_wayland_session_without_its_libraries_falls_back_to_xwayland():
    env = {"DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0"}
    assert preflight.display_problem(env, DEBIAN, loader=hide("libwayland-cursor.so.0")) is None
    assert "QT_QPA_PLATFORM" not in env  # Qt's default, X11 through XWayland
    line = preflight.display_problem({"WAYLAND_DISPLAY": "wayland-0"}, DEBIAN,
                                     loader=hide("libwayland-cursor.so.0"))
    assert "Wayland libraries" in line and "sudo apt install libwayland-cursor0" in line


def test_the_users_platform_choice_is_respected():
    assert preflight.display_problem({"QT_QPA_PLATFORM": "offscreen"}, DEBIAN, loader=hide(*HIDDEN)) is None
    env = {"QT_QPA_PLATFORM": "xcb", "DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0"}
    assert "X11 libraries" in preflight.display_problem(env, DEBIAN, loader=hide(*HIDDEN))
    assert env["QT_QPA_PLATFORM"] == "xcb"


def test_no_display_at_all_says_so():
    line = preflight.display_problem({}, DEBIAN, loader=everything)
    assert "no display" in line and "xvfb-run tunesmith" in line and "tunesmith --help" in line


def test_not_linux_is_not_checked():
    assert preflight.display_problem({}, DEBIAN, loader=hide(*HIDDEN), platform="win32") is None


def test_os_release_words_map_to_families():
    assert preflight.family_of('ID="linuxmint"\nID_LIKE="ubuntu debian"\n') == "apt"
    assert preflight.family_of('ID="rocky"\nID_LIKE="rhel centos fedora"\n') == "dnf"
    assert preflight.family_of("ID=endeavouros\nID_LIKE=arch\n") == "pacman"
    assert preflight.family_of('ID="opensuse-leap"\n') == "zypper"
    assert preflight.family_of("") is None


def _launch(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**base, **env},
                          capture_output=True, text=True, timeout=120)


def test_the_launcher_exits_2_with_one_line_before_qt_loads():
    """The real `tunesmith` entry point, with one library hidden from the check (a real machine
    without it would get Qt's abort, exit 134, from the same start)."""
    code = ("import sys; from app.gui import preflight; "
            "preflight.loads = lambda soname: soname != 'libxcb-icccm.so.4'; "
            "from app.launch import main; status = main([]); "
            "assert 'PySide6.QtWidgets' not in sys.modules, 'Qt was loaded'; sys.exit(status)")
    proc = _launch(code, {"DISPLAY": ":99"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "libxcb-icccm.so.4" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Reinstalling" not in proc.stderr


def test_without_a_terminal_the_line_is_also_a_desktop_notification(tmp_path):
    """Started from a desktop menu nobody reads stderr: `notify-send` gets the line too (here a
    script of that name on PATH that writes down its arguments)."""
    said = tmp_path / "said.txt"
    fake = tmp_path / "bin" / "notify-send"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{said}"\n', encoding="utf-8")
    fake.chmod(0o755)
    code = ("import sys; from app.gui import preflight; "
            "preflight.loads = lambda soname: soname != 'libxcb-icccm.so.4'; "
            "from app.launch import main; sys.exit(main([]))")
    proc = _launch(code, {"DISPLAY": ":99", "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 2, proc.stderr
    lines = said.read_text(encoding="utf-8").splitlines()
    assert lines[:2] == ["--app-name=Tunesmith", "Tunesmith cannot open its window"]
    assert lines[2].startswith("the window needs X11 libraries that are missing (libxcb-icccm.so.4)")


def test_the_launcher_without_a_display_exits_2():
    proc = _launch("import sys; from app.launch import main; sys.exit(main(['gui', '--smoke']))", {})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "no display" in proc.stderr
