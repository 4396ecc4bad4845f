"""A new user's first launch, photographed: start the real `tunesmith` command on an X server
(Xvfb when there is no display), capture the whole screen once its window has painted, and save
docs/first-run.png. Nothing is driven inside the window; a fresh TUNESMITH_HOME means no past runs.

    python docs/first_run.py [--out docs/first-run.png] [--wait 60] [--settle 8]
    python docs/first_run.py --wayland [--out docs/first-run-wayland.png]

--wayland starts a headless Weston (Debian: apt install weston) instead of an X server, starts
`tunesmith` in it as on a Wayland desktop (no DISPLAY), and saves Weston's own screenshot.

It exits 2 with the launcher's own message when the window cannot open (say, a missing X11
library), so on a bare machine it shows what a user would see.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCREEN = (1680, 1140)


def _grab(app) -> object:
    return app.primaryScreen().grabWindow(0).toImage()  # window 0: the X root, all windows on it


def _painted(image) -> bool:
    """More than a few colours in a grid of samples: the black root has one."""
    colours = {image.pixel(x, y) for x in range(0, image.width(), 40) for y in range(0, image.height(), 40)}
    return len(colours) > 8


def _window_part(image):
    """The screen cropped to what is drawn on it (no window manager: the window sits at 0, 0)."""
    black = image.pixel(image.width() - 1, image.height() - 1)
    right = next(x for x in range(image.width() - 1, 0, -1) if image.pixel(x, 2) != black)
    bottom = next(y for y in range(image.height() - 1, 0, -1) if image.pixel(2, y) != black)
    return image.copy(0, 0, right + 1, bottom + 1)


def _ended(app_proc) -> int:
    """`tunesmith` exited before its picture (the pre-flight's line, say): say what it said."""
    print(app_proc.stderr.read().strip() or f"tunesmith exited {app_proc.returncode}", file=sys.stderr)
    return app_proc.returncode or 1


def wayland(out: Path, settle: float) -> int:
    """The first launch on a Wayland session: headless Weston, its screenshooter."""
    if not shutil.which("weston") or not shutil.which("weston-screenshooter"):
        print("first_run: --wayland needs Weston (Debian: apt install weston)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tunesmith-first-run-") as home:
        runtime = Path(home) / "runtime"
        runtime.mkdir(mode=0o700)
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "QT_QPA_PLATFORM")}
        env.update(XDG_RUNTIME_DIR=str(runtime), WAYLAND_DISPLAY="tunesmith-first-run", XDG_SESSION_TYPE="wayland",
                   TUNESMITH_HOME=home, XDG_CONFIG_HOME=str(Path(home) / "config"))
        weston = subprocess.Popen(["weston", "--debug", "--backend=headless-backend.so", "--use-pixman",
                                   f"--socket={env['WAYLAND_DISPLAY']}", f"--width={SCREEN[0]}",
                                   f"--height={SCREEN[1]}"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            while not (runtime / env["WAYLAND_DISPLAY"]).exists():
                if weston.poll() is not None:
                    print("first_run: weston did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            app_proc = subprocess.Popen([shutil.which("tunesmith") or "tunesmith"], env=env,
                                        stderr=subprocess.PIPE, text=True)
            time.sleep(settle)
            if app_proc.poll() is not None:
                return _ended(app_proc)
            shots = Path(home) / "shots"
            shots.mkdir()
            subprocess.run(["weston-screenshooter"], cwd=shots, env=env, timeout=60, check=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(next(shots.glob("*.png"))), out)
            print(f"first_run: the window on Wayland {settle:.0f} s after launch; saved {out}")
            app_proc.terminate()
            app_proc.wait(timeout=30)
        finally:
            weston.terminate()
            weston.wait(timeout=30)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "first-run.png")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the window")
    parser.add_argument("--settle", type=float, default=8.0, help="seconds after it paints to take the picture")
    parser.add_argument("--wayland", action="store_true", help="on a headless Weston instead of an X server")
    args = parser.parse_args()
    if args.wayland:
        out = args.out if args.out != parser.get_default("out") else args.out.with_name("first-run-wayland.png")
        return wayland(out, args.settle + 4)  # no painted test here: Qt starts, then the engine loads
    if not os.environ.get("DISPLAY"):
        if not shutil.which("xvfb-run"):
            print("first_run: needs an X server: install Xvfb (Debian: apt install xvfb)", file=sys.stderr)
            return 2
        screen = f"-screen 0 {SCREEN[0]}x{SCREEN[1]}x24"
        return subprocess.call(["xvfb-run", "-a", "-s", screen, sys.executable, *sys.argv])
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}
    with tempfile.TemporaryDirectory(prefix="tunesmith-first-run-") as home:
        env["TUNESMITH_HOME"] = home
        env["XDG_CONFIG_HOME"] = str(Path(home) / "config")  # QSettings: no saved window state
        launcher = shutil.which("tunesmith") or sys.exit("first_run: `tunesmith` is not installed (pip install -e .)")
        started = time.monotonic()
        app_proc = subprocess.Popen([launcher], env=env, stderr=subprocess.PIPE, text=True)
        from PySide6.QtGui import QGuiApplication

        app = QGuiApplication([sys.argv[0], "-platform", "xcb"])
        shown = None
        while time.monotonic() - started < args.wait:
            if app_proc.poll() is not None:
                return _ended(app_proc)
            time.sleep(0.5)
            if shown is None and _painted(_grab(app)):
                shown = time.monotonic() - started
            if shown is not None and time.monotonic() - started > shown + args.settle:
                break  # the engine loads in the background: give it `settle` seconds to say so
        else:
            app_proc.kill()
            print(f"first_run: no window within {args.wait:.0f} s", file=sys.stderr)
            return 1
        image = _window_part(_grab(app))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        image.save(str(args.out))
        print(f"first_run: window painted {shown:.1f} s after launch; saved {args.out} "
              f"({image.width()}x{image.height()})")
        app_proc.terminate()
        app_proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
