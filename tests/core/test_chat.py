"""Chat with a trained adapter: streaming equals the whole answer, stop and stop strings end it,
the adapter switches off without a reload, and a conversation saves as a training row."""

from __future__ import annotations

import json
import threading

import pytest

from app.core.adapters import find_adapter
from app.core.chat import GenerationSettings, load_chat, save_conversation
from app.core.errors import RunError
from conftest import train_tiny

GREEDY = GenerationSettings(temperature=0, max_new_tokens=16)
QUESTION = [{"role": "user", "content": "How do I keep bread fresh?"}]


@pytest.fixture
def tiny_chat(tiny_run):
    return load_chat(tiny_run.run_id)


def test_streamed_text_equals_the_greedy_reply(tiny_chat):
    whole = tiny_chat.reply(QUESTION, GREEDY)
    pieces = list(tiny_chat.stream(QUESTION, GREEDY))
    assert len(pieces) > 1 and "".join(pieces) == whole
    assert tiny_chat.last.tokens == 16 and tiny_chat.last.tokens_per_s > 0 and not tiny_chat.last.stopped
    assert tiny_chat.last.cut  # the random tiny model never ends by itself: 16 tokens is the limit's end


def test_an_answer_the_model_ends_is_not_marked_cut(tiny_chat, monkeypatch):
    """The tiny model's next token is forced to its end token after 3 tokens (a model that ends)."""
    end = tiny_chat.tokenizer.eos_token_id
    generate = tiny_chat.model.generate

    def ends_early(**kwargs):
        out = generate(**{**kwargs, "max_new_tokens": 3})
        import torch
        return torch.cat([out, torch.tensor([[end]])], dim=1)

    monkeypatch.setattr(tiny_chat.model, "generate", ends_early)
    tiny_chat.reply(QUESTION, GenerationSettings(temperature=0, max_new_tokens=4))
    assert tiny_chat.last.tokens == 4 and not tiny_chat.last.cut
    tiny_chat.reply(QUESTION, GenerationSettings(temperature=0, max_new_tokens=40))
    assert tiny_chat.last.tokens == 4 and not tiny_chat.last.cut


def test_stop_ends_the_answer_after_the_current_token(tiny_chat):
    stop = threading.Event()
    settings = GenerationSettings(temperature=0, max_new_tokens=200)
    pieces = []
    for piece in tiny_chat.stream(QUESTION, settings, stop=stop):
        pieces.append(piece)
        stop.set()
    assert tiny_chat.last.stopped and tiny_chat.last.tokens < 10 and not tiny_chat.last.cut


def test_a_stop_string_cuts_the_answer_where_it_starts(tiny_chat):
    whole = tiny_chat.reply(QUESTION, GREEDY)
    # three printable characters from the second half (a random tiny model also emits partial
    # UTF-8, which a stream and a whole decode may render differently)
    marker = next(whole[i:i + 3] for i in range(len(whole) // 2, len(whole) - 2)
                  if whole[i:i + 3].isascii() and whole[i:i + 3].strip() == whole[i:i + 3])
    settings = GenerationSettings(temperature=0, max_new_tokens=16, stop=[marker])
    cut = whole[:whole.index(marker)]
    assert "".join(tiny_chat.stream(QUESTION, settings)) == cut
    assert tiny_chat.reply(QUESTION, settings) == cut


def test_the_system_prompt_goes_first_in_the_prompt(tiny_chat):
    ids = tiny_chat.prompt_ids(QUESTION, GenerationSettings(system_prompt="Talk like a pirate."))
    text = tiny_chat.tokenizer.decode(ids["input_ids"][0])
    assert text.index("Talk like a pirate.") < text.index("How do I keep bread fresh?")


def test_an_unfinished_run_chats_with_its_latest_checkpoint(tiny_model, chat_data):
    run = train_tiny(tiny_model, chat_data, steps=8, stop_at=3)
    assert run.status == "stopped"
    source = find_adapter(run.run_id)
    assert source.adapter_dir.name == "step-0000003" and source.base == str(tiny_model)
    with pytest.raises(RunError, match="no run 'nope'"):
        find_adapter("nope")


def test_a_saved_conversation_is_a_valid_training_row(tmp_path):
    from app.core.data.validate import check_file

    target = tmp_path / "keep.jsonl"
    turns = QUESTION + [{"role": "assistant", "content": "Wrap it in a cloth, matey."}]
    save_conversation(target, turns, system_prompt="Talk like a pirate.")
    save_conversation(target, turns)
    report = check_file(target)
    assert report.ok and report.format == "messages" and len(report.examples) == 2
    first = json.loads(target.read_text().splitlines()[0])["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    with pytest.raises(RunError, match="no answer yet"):
        save_conversation(target, QUESTION)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first user of the session's demo run trains it
def test_switching_the_adapter_off_gives_the_base_models_answer(demo_run):
    chat = load_chat(str(demo_run))
    question = [{"role": "user", "content": "How do I make garlic bread?"}]
    settings = GenerationSettings(temperature=0, max_new_tokens=40)
    tuned = chat.reply(question, settings)
    base = chat.reply(question, settings, adapter=False)
    assert tuned != base
    assert chat.reply(question, settings) == tuned  # on again: the same tuned answer, nothing reloaded
