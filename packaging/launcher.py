"""What the frozen app runs: the `tunesmith-cli` executable is the command line, `tunesmith` the
desktop app (both built from this one script by `tunesmith.spec`, so they share one bundle)."""

import multiprocessing
import sys
from pathlib import Path

if __name__ == "__main__":
    multiprocessing.freeze_support()
    if Path(sys.executable).stem.lower().endswith("-cli"):
        from app.launch import main
    else:
        from app.gui.application import main
    raise SystemExit(main())
