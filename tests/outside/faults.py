"""Run `tunesmith ARGS` with one fault at an exact call: the tool of the outside suite.

    python tests/outside/faults.py FAULT -- ARGS...

FAULT is `ACTION:CALL:N:TEXT`. CALL is `replace` (os.replace, every rename Tunesmith makes),
`rmtree` (shutil.rmtree), `unlink` (os.unlink) or `copy2` (shutil.copy2); the fault strikes at
the Nth call whose arguments, written `SRC -> DST|` (`PATH|` for one argument), contain TEXT.
ACTION `kill` ends the process there with SIGKILL, before the call runs (as a power cut or the
OOM killer would); `pause` touches the file named by $FAULT_FLAG and sleeps 60 s before the call
(for a second process to meet the first mid-way). Nothing else is changed: the CLI runs as
`python -m app ARGS` would; `-- -c CODE` runs CODE instead (what only the window does).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

CALLS = {"replace": (os, "replace"), "rmtree": (shutil, "rmtree"), "unlink": (os, "unlink"),
         "copy2": (shutil, "copy2")}


def install(fault: str) -> None:
    action, call, count, text = fault.split(":", 3)
    owner, name = CALLS[call]
    real = getattr(owner, name)
    seen = [0]

    def faulty(*args, **kwargs):
        paths = [str(a) for a in args[:2]]
        written = (" -> ".join(paths) if len(paths) == 2 else paths[0]) + "|"
        if text in written:
            seen[0] += 1
            if seen[0] == int(count):
                if action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                Path(os.environ["FAULT_FLAG"]).write_text(written, encoding="utf-8")
                time.sleep(60)
        return real(*args, **kwargs)

    setattr(owner, name, faulty)


if __name__ == "__main__":
    fault, separator, *argv = sys.argv[1:]
    assert separator == "--", __doc__
    install(fault)
    if argv[:1] == ["-c"]:  # what the window does and the CLI has no command for (deleting a run)
        exec(argv[1], {"__name__": "__main__"})
        sys.exit(0)
    from app.launch import main

    sys.exit(main(argv))
