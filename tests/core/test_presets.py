"""Every shipped preset loads; user presets win; a broken preset names its file and key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.core.errors import ConfigError
from app.core.paths import config_dir
from app.core.plan.presets import get_preset, list_presets, read_preset, resolve_budget, training_budget
from app.core.resources import shipped_dir
from app.core.units import GIB
from conftest import REPO

SHIPPED = sorted(shipped_dir("presets").glob("*.toml"))


def test_presets_ship_for_each_card_size_and_auto():
    assert {p.stem for p in SHIPPED} >= {"8gb", "12gb", "16gb", "24gb", "48gb", "80gb", "auto"}


@pytest.mark.parametrize("file", SHIPPED, ids=lambda f: f.stem)
def test_every_shipped_preset_loads(file):
    preset = read_preset(file)
    assert preset.id == file.stem and preset.name and preset.description
    if file.stem == "auto":
        assert preset.budget_gib is None
    else:
        assert preset.budget_gib == float(file.stem[:-2])
        assert 0 < preset.safety_margin_gib < preset.budget_gib
    assert preset.preferred_rank >= 16 and preset.context_cap >= 2048


def test_bigger_cards_never_prefer_less():
    cards = [p for p in list_presets() if p.budget_gib is not None]
    assert [p.budget_gib for p in cards] == sorted(p.budget_gib for p in cards)
    for small, big in zip(cards, cards[1:]):
        assert big.preferred_rank >= small.preferred_rank and big.context_cap >= small.context_cap


def test_names_resolve_with_or_without_gb():
    assert get_preset("24").id == get_preset("24GB").id == "24gb"
    with pytest.raises(ConfigError, match="no preset called 'huge'.*8gb.*huge.toml"):
        get_preset("huge")


def test_a_card_preset_budget_is_the_card_less_the_margin():
    budget = resolve_budget(get_preset("24gb"))
    assert budget.device == "cuda"
    assert budget.total_bytes == 24 * GIB and budget.usable_bytes == int(22.5 * GIB)


def test_auto_without_a_gpu_uses_the_available_ram():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    budget = training_budget("auto")
    assert budget.device == "cpu" and 0 < budget.usable_bytes < budget.total_bytes
    assert "RAM" in budget.source
    card = training_budget("24gb")  # training on this machine cannot use a card it lacks
    assert card.device == "cpu" and "the 24gb preset is for NVIDIA cards" in card.source


def test_the_device_line_says_what_a_plan_is_for_and_what_train_will_do_here():
    import torch

    from app.core.plan.cards import find_card
    from app.core.plan.presets import device_line

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert device_line(resolve_budget(get_preset("8gb"))) == (
        "planned for a card with 8 GiB (the 8gb preset); this machine has no NVIDIA card: Train will plan for this CPU")
    assert device_line(resolve_budget(get_preset("24gb"), card=find_card("RTX 4090"))) == (
        "planned for the RTX 4090 you chose; this machine has no NVIDIA card: Train will plan for this CPU")
    line = device_line(training_budget("8gb"))
    assert line.startswith("planned for this CPU: ") and line.endswith(
        " of RAM available; the 8gb preset is for NVIDIA cards")


def test_a_user_preset_is_listed_and_overrides_a_shipped_one():
    folder = config_dir() / "presets"
    folder.mkdir(parents=True)
    (folder / "laptop.toml").write_text('name = "My laptop"\nbudget_gib = 6\nsafety_margin_gib = 0.5\n')
    (folder / "24gb.toml").write_text('budget_gib = 24\nsafety_margin_gib = 3\n')
    ids = [p.id for p in list_presets()]
    assert "laptop" in ids and ids.count("24gb") == 1
    assert get_preset("laptop").name == "My laptop" and get_preset("laptop").preferred_rank == 16
    assert get_preset("24gb").safety_margin_gib == 3.0


@pytest.mark.parametrize("text,message", [
    ('budget_gib = 12\n', "missing key 'safety_margin_gib'"),
    ('budget_gib = "twelve"\nsafety_margin_gib = 1\n', "key 'budget_gib' must be a number, not 'twelve'"),
    ('budget_gib = 12\nsafety_margin_gib = 1\npreferred_rank = 0\n', "key 'preferred_rank' must be at least 1"),
    ('budget_gib = 12\nsafety_margin_gib = 1\ncontext_cap = 4096.5\n', "key 'context_cap' must be a whole number"),
    ('budget_gib = 12\nsafety_margin_gib = 1\nrank = 8\n', "unknown key 'rank'"),
    ('budget_gib = 4\nsafety_margin_gib = 4\n', "'safety_margin_gib' \\(4.0\\) must be below 'budget_gib'"),
    ('budget_gib = 12\nsafety_margin_gib = 1 1\n', "not valid TOML .*at line 2"),
])
def test_a_broken_preset_names_the_file_and_key(text, message):
    folder = config_dir() / "presets"
    folder.mkdir(parents=True)
    file = folder / "mine.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        get_preset("mine")
    assert str(file) in str(caught.value)
    assert caught.match(message)


def test_the_cli_reports_a_broken_preset_in_one_line_with_exit_2(tunesmith_home):
    folder = config_dir() / "presets"
    folder.mkdir(parents=True)
    (folder / "mine.toml").write_text('budget_gib = "a lot"\nsafety_margin_gib = 1\n')
    done = subprocess.run([sys.executable, "-m", "app", "plan", "--model", "Llama-3.2-1B-Instruct",
                           "--preset", "mine"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "mine.toml: key 'budget_gib' must be a number" in done.stderr
    assert "Traceback" not in done.stderr


def _tree(tmp_path, text: str, files: dict[str, str]):
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "cgroup"
    proc.write_text(text)
    for name, value in files.items():
        (tmp_path / "sys" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sys" / name).write_text(value)
    return proc, tmp_path / "sys"


def test_a_cgroup_v2_limit_caps_the_available_ram(tmp_path):
    """A container with 16 GiB: 10 GiB used, 2 GiB of it inactive file cache the kernel would drop."""
    from app.gpu.machine import cgroup_available

    proc, root = _tree(tmp_path, "0::/box/job\n", {
        "box/job/memory.max": f"{16 * GIB}\n", "box/job/memory.current": f"{10 * GIB}\n",
        "box/job/memory.stat": f"anon {8 * GIB}\ninactive_file {2 * GIB}\n",
        "box/memory.max": "max\n", "box/memory.current": f"{10 * GIB}\n", "box/memory.stat": "inactive_file 0\n"})
    assert cgroup_available(proc, root) == 8 * GIB


def test_a_tighter_parent_cgroup_wins_and_no_limit_is_none(tmp_path):
    from app.gpu.machine import cgroup_available

    proc, root = _tree(tmp_path, "0::/box/job\n", {
        "box/job/memory.max": "max\n", "box/job/memory.current": f"{3 * GIB}\n", "box/job/memory.stat": "",
        "box/memory.max": f"{4 * GIB}\n", "box/memory.current": f"{3 * GIB}\n", "box/memory.stat": ""})
    assert cgroup_available(proc, root) == 1 * GIB
    proc, root = _tree(tmp_path / "free", "0::/\n", {"memory.max": "max\n", "memory.current": "1\n",
                                                     "memory.stat": ""})
    assert cgroup_available(proc, root) is None


def test_a_cgroup_v1_limit_is_read_from_the_memory_controller(tmp_path):
    from app.gpu.machine import cgroup_available

    proc, root = _tree(tmp_path, "5:cpu:/\n4:memory:/docker/abc\n", {
        "memory/docker/abc/memory.limit_in_bytes": f"{8 * GIB}\n",
        "memory/docker/abc/memory.usage_in_bytes": f"{5 * GIB}\n",
        "memory/docker/abc/memory.stat": f"total_inactive_file {1 * GIB}\nhierarchical_memory_limit {6 * GIB}\n"})
    assert cgroup_available(proc, root) == 2 * GIB  # the hierarchy's 6 GiB, less 5 used, plus 1 of cache
    unlimited = _tree(tmp_path / "u", "4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n",
                                                       "memory/memory.usage_in_bytes": "1\n", "memory/memory.stat": ""})
    assert cgroup_available(*unlimited) is None
