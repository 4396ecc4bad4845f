"""The outside suite, deleting a run (the Runs tab's Delete): killed before the rename that takes the
run out of the list, the run is whole; killed while its hidden folder is removed, the run is gone
from the list and the next delete removes what was left."""

from __future__ import annotations

import signal

from conftest import train_tiny
from test_export_faults import tunesmith

DELETE = "import sys; from app.core.runs import delete_run; delete_run(sys.argv[1])"


def test_a_delete_killed_at_either_step_leaves_the_run_whole_or_gone_never_half(tiny_model, chat_data,
                                                                                 tunesmith_home):
    runs = tunesmith_home / "data" / "runs"
    first = train_tiny(tiny_model, chat_data, steps=2)
    killed = tunesmith("-c", DELETE.replace("sys.argv[1]", repr(first.run_id)), fault="kill:replace:1:.deleting|")
    assert killed.returncode == -signal.SIGKILL
    assert first.run_id in tunesmith("runs").stdout and (runs / first.run_id / "adapter").is_dir()  # whole
    killed = tunesmith("-c", DELETE.replace("sys.argv[1]", repr(first.run_id)), fault="kill:rmtree:1:.deleting|")
    assert killed.returncode == -signal.SIGKILL
    assert first.run_id not in tunesmith("runs").stdout  # gone from the list at once
    assert (runs / f".{first.run_id}.deleting").is_dir()  # what the killed delete had not yet removed
    second = train_tiny(tiny_model, chat_data, steps=2)
    done = tunesmith("-c", DELETE.replace("sys.argv[1]", repr(second.run_id)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in runs.iterdir()) == []
