"""What the window calls runs: the user's name, else the id without its date, numbered by start
where several share one; never two alike."""

from __future__ import annotations

from app.core.runs import RunSummary, display_names, newest_finished


def row(run_id: str, created: float, status: str = "finished", label: str = "") -> RunSummary:
    return RunSummary(run_id, status, "", 1, 1, None, None, "demo", "chats.jsonl", created, created, 1.0, label=label)


def test_repeated_names_are_numbered_by_start_and_a_label_wins():
    rows = [row("20261207-090000-demo-pirate_chef", 3), row("20261206-100000-demo-pirate_chef", 1),
            row("20261206-110000-demo-pirate_chef", 2, label="first try"), row("notes-run", 4)]
    assert display_names(rows) == {"20261206-100000-demo-pirate_chef": "demo-pirate_chef #1",
                                   "20261207-090000-demo-pirate_chef": "demo-pirate_chef #2",
                                   "20261206-110000-demo-pirate_chef": "first try", "notes-run": "notes-run"}


def test_the_newest_finished_run_whatever_the_order():
    rows = [row("a", 1), row("b", 3, status="stopped"), row("c", 2)]
    assert newest_finished(rows) == "c" and newest_finished([row("b", 3, status="failed")]) == ""
