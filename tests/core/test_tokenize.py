"""Label masks cover exactly the tokens the model should learn; truncation is counted."""

from __future__ import annotations

from app.core.data.formats import Example
from app.core.data.tokenize import (DEFAULT_CHAT_TEMPLATE, IGNORE, Tokenized, ensure_chat_template,
                                    tokenize_example)
from app.core.data.tokenize import truncate


def _trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE])


def test_labels_cover_exactly_the_assistant_turns(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "How long to boil an egg?"},
                {"role": "assistant", "content": "Six minutes for soft."},
                {"role": "user", "content": "And hard?"},
                {"role": "assistant", "content": "Ten minutes."}]
    ids, labels = tokenize_example(tiny_tokenizer, Example(1, "messages", messages=messages))
    assert len(ids) == len(labels)
    assert _trained_text(tiny_tokenizer, ids, labels) == "Six minutes for soft.<|im_end|>\nTen minutes.<|im_end|>\n"
    full = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert tiny_tokenizer.decode(ids) == full
    assert all(label in (IGNORE, token) for token, label in zip(ids, labels))


def test_labels_with_the_demo_models_own_template(demo_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    messages = [{"role": "user", "content": "Salt or pepper?"}, {"role": "assistant", "content": "Both, matey!"}]
    ids, labels = tokenize_example(tokenizer, Example(1, "messages", messages=messages))
    assert _trained_text(tokenizer, ids, labels) == "Both, matey!<|im_end|>\n"
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(ids)  # its default system turn


def test_prompt_completion_learns_only_the_completion(tiny_tokenizer):
    example = Example(1, "prompt_completion", prompt="Title: Soup\nIngredients:", completion=" tomato, onion")
    ids, labels = tokenize_example(tiny_tokenizer, example)
    assert _trained_text(tiny_tokenizer, ids, labels) == " tomato, onion<|im_end|>"


def test_plain_text_learns_everything(tiny_tokenizer):
    ids, labels = tokenize_example(tiny_tokenizer, Example(1, "text", text="Rest the steak."))
    assert labels == ids
    assert tiny_tokenizer.decode(ids) == "Rest the steak.<|im_end|>"


def test_default_template_is_applied_only_when_the_model_has_none(tiny_tokenizer):
    import copy

    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    assert ensure_chat_template(bare) is True
    assert bare.chat_template == DEFAULT_CHAT_TEMPLATE
    assert ensure_chat_template(tiny_tokenizer) is False


def test_truncation_is_counted_and_nothing_left_to_learn_is_dropped():
    keep = Tokenized(1, list(range(10)), [IGNORE] * 4 + list(range(4, 10)))
    cut = Tokenized(2, list(range(30)), [IGNORE] * 5 + list(range(5, 30)))
    empty = Tokenized(3, list(range(30)), [IGNORE] * 20 + list(range(20, 30)))
    kept, truncated, dropped = truncate([keep, cut, empty], seq_len=12)
    assert (truncated, dropped) == (2, 1)
    assert [e.line for e in kept] == [1, 2]
    assert len(kept[1].input_ids) == 12 and kept[1].labels[-1] == 11
