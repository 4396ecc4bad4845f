"""What the frozen app runs: the `tunesmith-cli` executable is the command line, `tunesmith` the
desktop app (both built from this one script by `tunesmith.spec`, so they share one bundle).

The engine starts helper processes as `python -m module ...` (llama.cpp's quantizer; torchrun,
which starts its workers as `python -u -m app.core.train.parallel.worker ...`); in the frozen app that
`python` is `tunesmith-cli` (app.core.portable.python_command), so `-m module` runs the module
here as python would, after the interpreter flags torchrun passes."""

import multiprocessing
import os
import runpy
import sys
from pathlib import Path

PYTHON_FLAGS = ("-u", "-B", "-E", "-s", "-O")  # accepted and ignored: the bundle's Python is fixed


def run_module_argv(argv: list[str]) -> list[str] | None:
    """For `[-u] -m module args...`, the module's argv (module first, as runpy sets it); else None."""
    rest = list(argv)
    while rest and rest[0] in PYTHON_FLAGS:
        rest.pop(0)
    return rest[1:] if len(rest) >= 2 and rest[0] == "-m" else None


if __name__ == "__main__":
    multiprocessing.freeze_support()
    for stream in ("stdout", "stderr"):  # the windowed app on Windows has none: a library's print (tqdm) must not fail
        if getattr(sys, stream) is None:
            setattr(sys, stream, open(os.devnull, "w", encoding="utf-8"))
    module_argv = run_module_argv(sys.argv[1:])
    if module_argv is not None:
        sys.argv = module_argv
        runpy.run_module(module_argv[0], run_name="__main__", alter_sys=True)
        raise SystemExit(0)
    if Path(sys.executable).stem.lower().endswith("-cli"):
        from app.launch import main
    else:
        from app.gui.application import main
    raise SystemExit(main())
