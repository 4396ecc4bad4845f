"""What differs on Windows, tested here on Linux: names and path lengths through PureWindowsPath
(the checks take `windows=True`, or app.core.portable.on_windows is patched to say so), locks
across processes started with `spawn` (Windows' only start method), a console whose code page
is cp1252, a Unicode home with spaces, files opened without an encoding, a Notepad file (CRLF
line ends, a byte-order mark), and the frozen launcher's `python -m` stand-in. What only Windows
itself can show (its file locking, its registry, nvml.dll) is listed as untried in the README's
Windows section."""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path, PureWindowsPath

import pytest

from app.core import portable
from app.core.errors import ExportError, RunError
from conftest import REPO

DEVICES = ["CON", "con", "Con.txt", "PRN", "AUX", "NUL", "nul.tar.gz", "COM1", "com9.log", "LPT1", "LPT9",
           "CON .txt", "CONIN$"]
FINE = ["CONSOLE", "con-q4_0.gguf", "COM10", "LPT0x", "Jürgen Müller", "田中 太郎", "run 1", "a.b.c", "NUL_"]


@pytest.mark.parametrize("name", DEVICES)
def test_device_names_are_refused(name):
    assert "device name" in portable.name_problem(name)


@pytest.mark.parametrize("name", FINE)
def test_ordinary_names_with_spaces_and_non_ascii_pass(name):
    assert portable.name_problem(name) == ""


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="PureWindowsPath.is_reserved() is deprecated from 3.13")
def test_the_device_list_agrees_with_pathlib():
    for name in ("CON", "con.txt", "NUL", "COM1", "LPT9", "CONSOLE", "COM10", "run.jsonl"):
        assert bool(portable.name_problem(name)) == PureWindowsPath(name).is_reserved(), name


@pytest.mark.parametrize("name, what", [("run.", "ends with a dot"), ("run ", "ends with a dot or a space"),
                                        ("a:b", "':'"), ("why?", "'?'"), ("tab\there", "\\x09"),
                                        ('say "hi"', "'\"'")])
def test_names_windows_changes_or_refuses(name, what):
    assert what in portable.name_problem(name)


def test_path_length_counts_what_goes_inside():
    base = "C:\\Users\\" + "x" * 40
    fits = base + "\\" + "r" * (258 - len(base) - 1)
    assert len(fits) == 258 and portable.path_problem(fits, windows=True) == ""
    assert portable.path_problem(fits + "y", windows=True) == ""  # 259 characters: the longest that works
    assert "too long for Windows (260 characters" in portable.path_problem(fits + "yz", windows=True)
    assert "too long" in portable.path_problem(base, windows=True, reserve=259 - len(base))
    assert portable.path_problem(base, windows=True, reserve=258 - len(base)) == ""
    assert portable.path_problem("C:\\" + "x" * 400, windows=False) == ""  # elsewhere nothing to refuse


def test_a_bad_folder_anywhere_in_the_path_is_named():
    assert "'NUL'" in portable.path_problem("D:\\exports\\NUL\\model", windows=True)
    assert "'out.'" in portable.path_problem("D:\\exports\\out.", windows=True)
    assert portable.path_problem("\\\\server\\share\\Jürgen\\out", windows=True) == ""
    assert portable.path_problem("..\\out", windows=True) == ""


@pytest.mark.parametrize("text, expected", [("Café.", "Caf"), (".hidden", "hidden"), ("CON", "_CON"),
                                            ("nul.v2", "_nul.v2"), ("...", "run"), ("my run 1", "my-run-1")])
def test_slugs_are_names_every_system_keeps(text, expected):
    from app.core.runs import slug

    name = slug(text)
    assert name == expected and portable.name_problem(name) == ""


def test_a_run_whose_path_would_be_too_long_for_windows_is_refused(monkeypatch, tmp_path, tiny_model, chat_data):
    """Windows is simulated (on_windows patched): the home is put deep enough that the run's
    folder plus its checkpoints pass 259 characters."""
    from conftest import train_tiny

    deep = tmp_path / ("d" * 60) / ("e" * 60) / ("f" * 60)
    monkeypatch.setenv("TUNESMITH_HOME", str(deep))
    monkeypatch.setattr(portable, "on_windows", lambda: True)
    with pytest.raises(RunError, match="too long for Windows"):
        train_tiny(tiny_model, chat_data, steps=1)
    runs = deep / "data" / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a refused run leaves nothing behind"


def test_a_run_fits_in_what_the_path_check_reserves(tiny_run):
    """RUN_INNER must cover every file a run writes below its folder, or the check above lets a
    run through that Windows cannot write."""
    run_dir = Path(tiny_run.run_dir)
    longest = max(len(p.relative_to(run_dir).as_posix()) for p in run_dir.rglob("*"))
    assert longest < portable.RUN_INNER, longest


def test_export_to_a_device_name_is_refused_before_anything_is_written(monkeypatch, tmp_path, tiny_run, capsys):
    from app.cli import main
    from app.core.export.exporter import export_run

    monkeypatch.setattr(portable, "on_windows", lambda: True)
    with pytest.raises(ExportError, match="device name"):
        export_run(tiny_run.run_id, "adapter", tmp_path / "CON")
    assert main(["export", tiny_run.run_id, "--format", "adapter", "--out", str(tmp_path / "aux")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device name on Windows (AUX)" in err[0]
    assert not list(tmp_path.glob("*CON*")) and not list(tmp_path.glob("*aux*"))


def test_several_processes_are_refused_on_windows(monkeypatch, capsys, chat_data):
    from app.cli import main

    monkeypatch.setattr(portable, "on_windows", lambda: True)
    assert main(["plan", "--model", "demo", "--data", str(chat_data), "--gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "need Linux" in err and "--gpus 1" in err and "Traceback" not in err
    monkeypatch.setattr(portable, "on_windows", lambda: False)
    assert main(["plan", "--model", "demo", "--data", str(chat_data), "--gpus", "2"]) == 0


def test_replace_waits_for_a_reader_on_windows(monkeypatch, tmp_path):
    """Linux lets a file be replaced while open, so Windows' refusal is simulated: os.replace
    raises PermissionError twice (a reader holding status.json), then succeeds."""
    real, calls = os.replace, []

    def busy(source, target):
        calls.append(target)
        if len(calls) <= 2:
            raise PermissionError(13, "The process cannot access the file", str(target))
        real(source, target)

    source, target = tmp_path / "new", tmp_path / "status.json"
    source.write_text("new")
    target.write_text("old")
    monkeypatch.setattr(os, "replace", busy)
    portable.replace(source, target, windows=True)
    assert target.read_text() == "new" and len(calls) == 3
    calls.clear()
    source.write_text("newer")
    with pytest.raises(PermissionError):  # elsewhere a PermissionError is real: no waiting
        portable.replace(source, target, windows=False)


def test_a_cp1252_stream_prints_what_it_cannot_encode_as_question_marks():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="cp1252")
    portable.console_safe(stream)
    stream.write("Finished: adapter in C:\\Users\\田中\\runs → café\n")
    stream.flush()
    assert raw.getvalue() == "Finished: adapter in C:\\Users\\??\\runs ? café\n".encode("cp1252")
    utf8 = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    portable.console_safe(utf8, None)
    assert utf8.errors == "strict"


def test_ctrl_break_stops_a_run_like_ctrl_c(monkeypatch):
    """SIGBREAK exists only on Windows: SIGUSR1 stands in for it, sent to this process."""
    from app.cli.progress import Progress, install_stop_handler

    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)
    try:
        stop = install_stop_handler(Progress(stream=io.StringIO()))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.wait(5)
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGUSR1, before[1])


def _try_lock(run_dir: str, queue) -> None:
    from app.core.run_lock import RunLock

    try:
        with RunLock(Path(run_dir)):
            queue.put("acquired")
    except RunError as err:
        queue.put(f"refused: {err}")


def test_the_run_lock_holds_across_spawned_processes(tmp_path):
    """Windows starts every child with `spawn` (a fresh interpreter that imports the target)."""
    from app.core.run_lock import RunLock

    run_dir = tmp_path / "Jürgen's run"
    run_dir.mkdir()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with RunLock(run_dir, "training"):
        child = context.Process(target=_try_lock, args=(str(run_dir), queue))
        child.start()
        answer = queue.get(timeout=120)
        child.join(60)
    assert answer.startswith("refused: run Jürgen's run is in use by process"), answer
    child = context.Process(target=_try_lock, args=(str(run_dir), queue))
    child.start()
    assert queue.get(timeout=120) == "acquired"
    child.join(60)


def test_python_command_in_the_frozen_app_is_the_command_line_launcher(monkeypatch):
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    for exe in ("/opt/Tunesmith/tunesmith.exe", "/opt/Tunesmith/tunesmith-cli.exe"):
        monkeypatch.setattr(sys, "executable", exe)
        command = portable.python_command("-m", "app.core.export.quantize")
        assert Path(command[0]).name == "tunesmith-cli.exe" and command[1:] == ["-m", "app.core.export.quantize"]
    monkeypatch.setattr(sys, "frozen", False)
    assert portable.python_command("-m", "x") == [sys.executable, "-m", "x"]


def test_the_launcher_runs_modules_as_python_does():
    """torchrun starts workers as `python -u -m module args`; the frozen launcher must too."""
    proc = subprocess.run([sys.executable, str(REPO / "packaging" / "launcher.py"), "-u", "-m", "app", "--version"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().startswith("tunesmith "), proc.stdout + proc.stderr


def test_ram_without_proc_comes_from_psutil(monkeypatch, tmp_path):
    """Windows and macOS have no /proc: pointing the readers at a missing file takes that path."""
    from app.gpu import machine

    with_proc, rss_proc = machine.available_ram(), machine.process_ram_bytes()
    monkeypatch.setattr(machine, "MEMINFO", tmp_path / "no-meminfo")
    monkeypatch.setattr(machine, "STATM", tmp_path / "no-statm")
    without, rss = machine.available_ram(), machine.process_ram_bytes()
    assert without != 8 * machine.GIB, "the modest-machine guess, not a measurement"
    assert 0.5 < without / with_proc < 2 or with_proc < without  # a cgroup limit makes /proc's smaller
    assert 0.5 < rss / rss_proc < 2


def test_a_run_in_a_unicode_home_on_a_cp1252_console(tmp_path, tiny_model, chat_data):
    """The real command line, as on Windows in a western-European code page: output encoded as
    cp1252, a home and a data file under a user name with spaces and Japanese, every file the
    engine opens without an encoding an error (EncodingWarning: Windows would read it as cp1252)."""
    home = tmp_path / "Jürgen 田中" / "Tunesmith home"
    data = tmp_path / "Jürgen 田中" / "my chats (2).jsonl"
    data.parent.mkdir(parents=True)
    data.write_bytes(chat_data.read_bytes())
    env = {**os.environ, "TUNESMITH_HOME": str(home), "PYTHONIOENCODING": "cp1252", "PYTHONWARNDEFAULTENCODING": "1"}
    code = ("import sys, warnings, app.cli as cli; quiet = cli._quiet_libraries\n"
            "def strict(debug):\n"
            "    quiet(debug)  # which ignores every warning: ours is put back in front\n"
            "    warnings.filterwarnings('error', category=EncodingWarning, module=r'app\\.')\n"
            "cli._quiet_libraries = strict\n"
            "from app.launch import main; sys.exit(main(sys.argv[1:]))")

    def tunesmith(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True,
                              timeout=600)

    train = tunesmith("train", "--model", str(tiny_model), "--data", str(data), "--max-steps", "2",
                      "--seq-len", "128", "--batch", "4", "--name", "Café du 田中.")
    out, err = train.stdout.decode("cp1252"), train.stderr.decode("cp1252")
    assert train.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "EncodingWarning" not in err
    assert "Finished: adapter in" in out and "J\u00fcrgen ??" in out  # ü is in cp1252, 田中 is not
    runs = list((home / "data" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("-Caf-du") and portable.name_problem(runs[0].name) == ""
    listing = tunesmith("runs")
    assert listing.returncode == 0 and runs[0].name in listing.stdout.decode("cp1252")
    export = tunesmith("export", runs[0].name, "--format", "adapter", "--out", str(data.parent / "export ü"))
    assert export.returncode == 0, export.stderr.decode("cp1252")[-2000:]
    assert (data.parent / "export ü" / "adapter_model.safetensors").is_file()



def test_a_notepad_file_with_crlf_and_a_byte_order_mark_is_read_with_its_line_numbers(tmp_path, tiny_model, capsys):
    from app.cli import main

    lines = (REPO / "resources" / "data" / "examples" / "messages.jsonl").read_text(encoding="utf-8").splitlines()
    good, bad = tmp_path / "chats.jsonl", tmp_path / "broken.jsonl"
    good.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(lines) + "\r\n").encode("utf-8"))
    bad.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join([*lines[:2], "{not json", *lines[2:]]) + "\r\n").encode("utf-8"))
    assert main(["check-data", str(good), "--model", str(tiny_model)]) == 0
    assert f"{len(lines)} usable, 0 with problems" in capsys.readouterr().out
    assert main(["check-data", str(bad), "--model", str(tiny_model)]) == 2
    out = capsys.readouterr()
    assert f"{bad}:3: bad JSON" in out.out + out.err


def test_a_run_with_a_file_open_elsewhere_is_deleted_whole_or_not_at_all(monkeypatch, tiny_run):
    """Windows refuses to rename a folder while another program has a file in it open; Linux
    does not, so the refusal is simulated (os.replace raises what Windows raises)."""
    from app.core.runs import delete_run, list_runs, open_run

    run = open_run(tiny_run.run_id)
    before = sorted(p.relative_to(run.dir).as_posix() for p in run.dir.rglob("*"))
    real = os.replace

    def in_use(source, target):
        if Path(source) == run.dir:
            raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                      "process", str(source))
        real(source, target)

    monkeypatch.setattr(os, "replace", in_use)
    with pytest.raises(RunError, match=rf"run {run.id} was not deleted: .*being used by another process.*"
                                       "Nothing was removed"):
        delete_run(run.id)
    after = sorted(p.relative_to(run.dir).as_posix() for p in run.dir.rglob("*") if p.name != ".lock-holder.json")
    assert after == [name for name in before if name != ".lock-holder.json"]
    assert [r.id for r in list_runs()] == [run.id]
    monkeypatch.setattr(os, "replace", real)
    left = run.dir.parent / ".20261201-000000-old.deleting" / "checkpoints"  # an earlier delete's remains
    left.mkdir(parents=True)
    delete_run(run.id)
    assert list_runs() == [] and list(run.dir.parent.iterdir()) == []  # no hidden remains either
