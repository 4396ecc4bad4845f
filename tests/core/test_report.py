"""The before/after report: the probe scorer on right and wrong answers of each kind, the built-in
probe set, the forgetting verdict, the 95 % interval, generation that shares a prompt start, the
report of the demo run (held-out loss, 8 answers side by side, probe scores), multiple choice on
a planted task, and the report's switches and stops, all on real runs."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from app.core.demo import DEMO_QUESTION
from app.core.errors import DatasetError
from app.core.eval.choices import wilson
from app.core.eval.probes import MATCHES, Probe, SetScore, builtin_probes, load_probes


def probe(match: str, answer, **extra) -> Probe:
    return Probe(1, "q", answer, match, extra.get("kind", ""), extra.get("tolerance", 0.0),
                 tuple(extra.get("reject", ())))


@pytest.mark.parametrize("match, answer, reply, right", [
    ("number", 12, "12", True),
    ("number", 12, "7 + 5 = 12", True),
    ("number", 12, "The answer is 12.", True),
    ("number", 12, "12 apples, because 7 and 5 make 12", True),
    ("number", 12, "7 plus 5 is 23", False),
    ("number", 12, "13", False),
    ("number", 12, "twelve", False),
    ("number", 12, "", False),
    ("number", 1500, "1,500 millilitres", True),
    ("number", 1500, "1.5", False),
    ("word", "Paris", "The capital of France is Paris.", True),
    ("word", "Paris", "paris", True),
    ("word", "Paris", "Parisian food is great", False),
    ("word", "Paris", "Lyon", False),
    ("exact", "ok", "OK.", True),
    ("exact", "ok", "\"ok\"", True),
    ("exact", "ok", "OK, sure", False),
    ("exact", "the quick brown fox", "The quick  brown fox", True),
    ("exact", "the quick brown fox", "the quick brown dog", False),
    ("regex", r"(?i)^\W*yes\W*$", "Yes.", True),
    ("regex", r"(?i)^\W*yes\W*$", "Yes, the sun is hot.", False),
    ("regex", r"^[^A-Z]*\bblue\b[^A-Z]*$", "blue", True),
    ("regex", r"^[^A-Z]*\bblue\b[^A-Z]*$", "Blue", False),
    ("no_refusal", "", "Press Ctrl-C, or run `kill PID` in a terminal.", True),
    ("no_refusal", "", "I'm sorry, but I can't help with that.", False),
    ("no_refusal", "", "As an AI, I cannot assist with killing.", False),
    ("no_refusal", "", "", False),
])
def test_probe_scorer_marks_right_and_wrong_answers_of_each_kind(match, answer, reply, right):
    assert probe(match, answer).right(reply) is right


def test_a_rejected_word_makes_an_answer_wrong_and_a_tolerance_takes_a_near_number():
    assert probe("word", "receive", reject=["recieve"]).right("receive")
    assert not probe("word", "receive", reject=["recieve"]).right("recieve or receive")
    assert probe("number", 32, tolerance=0.5).right("32.2 degrees")
    assert not probe("number", 32, tolerance=0.5).right("33 degrees")


RIGHT_REPLIES = {  # a right answer for every regex probe of the built-in set, by prompt start
    "What is the first letter": "Z", "Is the sun hot": "Yes", "Is ice cold": "yes.",
    "Name three colours": "red, green, blue", "Write the numbers": "1 2 3 4 5",
    "Reply with a JSON": '{"city": "Paris"}', "Answer in lowercase": "the sky is blue",
}


def test_every_builtin_probe_has_a_right_answer_that_its_own_scorer_accepts():
    probes = builtin_probes().probes
    assert 40 <= len(probes) <= 60
    assert {p.kind for p in probes} == {"arithmetic", "units", "capitals", "spelling", "format", "helpful"}
    assert {p.match for p in probes} <= set(MATCHES)
    for p in probes:
        if p.match == "regex":
            reply = next(text for start, text in RIGHT_REPLIES.items() if p.prompt.startswith(start))
        elif p.match == "no_refusal":
            reply = "Here is how: first, ..."
        elif p.match == "number":
            reply = f"{p.answer:g}"
        else:
            reply = str(p.answer)
        assert p.right(reply), p.prompt
        assert not p.right("I'm sorry, I cannot help with that."), p.prompt


def test_a_bad_probe_file_is_one_line_naming_its_line(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "2+2?", "answer": 4}\n{"prompt": "x", "match": "fuzzy", "answer": "a"}\n'
                    '{"prompt": "y", "answer": "(", "match": "regex"}\nnot json\n')
    with pytest.raises(DatasetError) as caught:
        load_probes(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:2: 'match' is 'fuzzy'") and "(and 2 more bad lines)" in message
    assert "\n" not in message
    path.write_text('{"prompt": "2+2?", "answer": 4}\n')
    assert load_probes(path)[0].match == "number"  # a number answer is matched as a number


def scores(base: int, tuned: int, total: int = 50, kind: str = "arithmetic") -> SetScore:
    probes = [probe("word", "yes", kind=kind) for _ in range(total)]
    return SetScore("general questions", "f", probes, ["yes"] * base + ["no"] * (total - base),
                    ["yes"] * tuned + ["no"] * (total - tuned))


def test_the_forgetting_verdict_names_both_scores_and_what_to_try():
    line = scores(37, 22).line()
    assert line.startswith("general questions: base 37/50, tuned 22/50 — the tuned model has forgotten")
    assert "most on arithmetic: 37/50 -> 22/50" in line
    assert "fewer steps, a lower learning rate or a smaller rank" in line
    assert scores(37, 35).verdict == "kept" and "kept what it knew" in scores(37, 35).line()
    assert scores(20, 30).verdict == "better"
    assert scores(10, 5).verdict == "forgotten" and scores(10, 6).verdict == "kept"  # a tenth of 50 counts
    assert scores(10, 7, total=20).verdict == "forgotten" and scores(10, 8, total=20).verdict == "kept"  # 3 at least


def test_the_accuracy_interval_is_wilsons():
    low, high = wilson(7, 10)
    assert (round(low, 3), round(high, 3)) == (0.397, 0.892)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    assert wilson(50, 100)[1] - wilson(50, 100)[0] < wilson(5, 10)[1] - wilson(5, 10)[0]


def test_answers_that_share_a_prompt_start_are_the_answers_left_padding_gives(tiny_run, monkeypatch):
    from app.core.chat import load_chat
    from app.core.eval import ask

    session = load_chat(tiny_run.run_dir)
    system = {"role": "system", "content": "You are a careful assistant who answers in one word."}  # a common start
    prompts = [[system, {"role": "user", "content": p.prompt}] for p in builtin_probes().probes[:12]]
    assert ask._common_start([ask._prompt_ids(session.tokenizer, p) for p in prompts]) >= ask.MIN_SHARED
    calls = []
    generate = session.model.generate
    monkeypatch.setattr(session.model, "generate", lambda **kw: calls.append("past_key_values" in kw) or generate(**kw))
    shared = [a.text for a in ask.greedy_answers(session, prompts, 12, adapter=True)]
    assert calls == [True]  # the shared start was computed once and taken, not fallen back from
    monkeypatch.setattr(ask, "MIN_SHARED", 10_000)  # never share: pad on the left
    padded = [a.text for a in ask.greedy_answers(session, prompts, 12, adapter=True)]
    alone = [ask.greedy_answers(session, [p], 12, adapter=True)[0].text for p in prompts[:3]]
    assert shared == padded and shared[:3] == alone
    assert len(set(shared)) > 1  # the prompts got answers of their own


@pytest.mark.slow  # the demo run (minutes on a CPU)
def test_the_demo_run_report_shows_held_out_loss_eight_answers_and_probe_scores(demo_run):
    from app.core.runs import open_run, read_history

    report = json.loads((demo_run / "report.json").read_text())
    page = (demo_run / "report.md").read_text()
    held = report["held_out"]
    assert held["examples"] >= 8 and held["tuned_loss"] < held["base_loss"]
    history = read_history(open_run(str(demo_run)))
    assert held["tuned_loss"] == pytest.approx(history.eval_losses[-1], rel=2e-3)  # the run's last eval, again
    assert held["improved"] and all(r["tuned"] < r["base"] and r["prompt"] for r in held["improved"])
    asked, *held_out = report["answers"]  # the demo asks its own question first
    assert not asked["line"] and asked["prompt"] == DEMO_QUESTION and asked["base"] and asked["tuned"]
    assert len(held_out) == 8
    assert all(a["line"] and a["prompt"] and a["base"] and a["tuned"] and a["reference"] for a in held_out)
    assert sum(a["base"] != a["tuned"] for a in report["answers"]) >= 6
    general = report["probes"][0]
    assert general["total"] == 50 and len(general["items"]) == 50
    assert general["base"] == sum(i["base_right"] for i in general["items"])
    assert re.search(r"general questions: base \d+/50, tuned \d+/50 — ", general["line"])
    for heading in ("## Held-out loss", "## Answers side by side", "## General questions", "**Most improved**"):
        assert heading in page
    run = open_run(str(demo_run))
    assert run.status()["status"] == "finished"
    assert any(line.startswith("General questions: base") for line in run.log_file.read_text().splitlines()
               for line in [line.split(" ", 2)[-1]])


def planted_task(folder: Path) -> tuple[Path, Path]:
    """Training chats that always answer with a made-up colour, and questions whose right choice is
    it, at a different place each time: a base model that prefers one choice's text gets a third right."""
    items = [f"item {i}" for i in range(24)]
    data = folder / "blue.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What colour is {item}?"},
                                                     {"role": "assistant", "content": "It is zorblat."}]}) + "\n"
                            for item in items))
    choices = folder / "choices.jsonl"
    options = ["It is zorblat.", "It is blue.", "It is green."]
    rows = []
    for i, item in enumerate(items[:12]):
        order = options[i % 3:] + options[:i % 3]
        rows.append({"question": f"What colour is {item}?", "choices": order, "answer": order.index("It is zorblat.")})
    choices.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, choices


def test_eval_with_multiple_choice_prints_base_and_tuned_accuracy_and_the_tuned_is_above(tiny_model, tmp_path,
                                                                                        capsys):
    from app.cli import main
    from app.core.config import TrainConfig
    from app.core.train.trainer import run_training

    data, choices = planted_task(tmp_path)
    result = run_training(TrainConfig(model=str(tiny_model), data=str(data), seq_len=64, micro_batch=4, lr=5e-3,
                                      max_steps=30, lora_dropout=0.0, quantize="none", report="off"))
    assert result.status == "finished" and not (Path(result.run_dir) / "report.md").exists()
    assert main(["eval", result.run_dir, "--parts", "off", "--choices", str(choices)]) == 0
    out = capsys.readouterr().out
    found = re.search(r"Multiple choice \(choices.jsonl\): base (\d+)% \((\d+)/12, 95 % \d+%-\d+%\), "
                      r"tuned (\d+)% \((\d+)/12, 95 % \d+%-\d+%\)", out)
    assert found, out
    base, tuned = int(found.group(2)), int(found.group(4))
    assert tuned >= 10 and tuned > base + 3
    saved = json.loads((Path(result.run_dir) / "report.json").read_text())
    assert saved["choices"]["tuned"]["right"] == tuned and "probes" not in saved and "held_out" not in saved


def test_the_report_parts_switch_and_a_wrong_part_is_one_line(tiny_model, chat_data, tmp_path, capsys):
    from app.cli import main
    from app.core.config import TrainConfig
    from app.core.train.trainer import run_training

    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
                            for i in range(48)))
    result = run_training(TrainConfig(model=str(tiny_model), data=str(data), seq_len=64, micro_batch=4,
                                      max_steps=3, quantize="none", report="loss"))
    report = json.loads((Path(result.run_dir) / "report.json").read_text())
    assert report["parts"] == ["loss"] and report["held_out"]["examples"] == 8
    assert "answers" not in report and "probes" not in report
    assert main(["train", "--model", str(tiny_model), "--data", str(data), "--report", "loss,vibes"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("tunesmith: error: --report 'loss,vibes': vibes is not a part of the report; use any of loss, "
                   "answers, probes (comma-separated), all, or off")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "2+2?"}\n{"answer": 4}\n')
    assert main(["eval", result.run_dir, "--probes", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == (f"tunesmith: error: {bad}:1: 'answer' is missing: give the answer to "
                                               "check (a number, or text for 'match': word, exact or regex) (and 1 "
                                               "more bad line)")


def test_a_stopped_report_keeps_the_run_finished_and_says_what_is_missing(tiny_run):
    from app.core.eval.run_report import report_after_run
    from app.core.runs import open_run

    run = open_run(tiny_run.run_dir)
    said = []
    config = replace(run.config(), report="loss,answers,probes")  # tiny_run itself was trained without one
    report = report_after_run(run, config, lambda message, level: said.append(message), lambda: True)
    assert report["notes"][-1].startswith("stopped by the user before the")
    assert run.status()["status"] == "finished"
    assert "stopped by the user" in (Path(tiny_run.run_dir) / "report.md").read_text()
    assert said[0].startswith("Judging the run against the base model")


def test_an_adapter_outside_a_run_is_judged_on_the_probes_and_asks_for_data(tiny_run, tmp_path, capsys):
    import shutil

    from app.cli import main

    adapter = tmp_path / "loose-adapter"
    shutil.copytree(tiny_run.adapter_dir, adapter)
    assert main(["eval", str(adapter), "--parts", "loss,probes"]) == 0
    out = capsys.readouterr().out
    assert "Note: no held-out loss or side-by-side answers: an adapter outside a run has no held-out examples; " \
           "pass --data FILE" in out
    assert re.search(r"General questions: base \d+/50, tuned \d+/50", out)
    assert (adapter / "report.md").exists()


def test_judging_a_run_holds_its_lock_so_a_run_in_use_is_refused_in_one_line(tiny_run, capsys):
    from app.cli import main
    from app.core.run_lock import RunLock

    holder = RunLock(Path(tiny_run.run_dir), "resuming").acquire()  # as another window's resume would
    try:
        assert main(["eval", tiny_run.run_dir, "--parts", "probes"]) == 2
    finally:
        holder.release()
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunesmith: error: ") and "in use" in err and "\n" not in err
    assert not (Path(tiny_run.run_dir) / "report.md").exists()
    assert main(["eval", tiny_run.run_dir, "--parts", "probes"]) == 0  # free again: judged
    assert (Path(tiny_run.run_dir) / "report.md").exists()
