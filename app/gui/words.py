"""The window's words for what app.core says in the command line's: a message from the core names
`--seq-len` or `pip install flash-attn`, the window names its own control ("Sequence length") or
says what to install in words. `plain` is applied to every core message a label shows;
`command_line_words` finds any that slipped through (the walk-through and the tests ask it)."""

from __future__ import annotations

import re

# Longest first where one starts another ("--batch 1" before "--batch"). A flag with no control of
# its own in the window (multi-machine runs) keeps a description instead.
FLAGS = [
    ("pass --data to fit your examples", "choose a dataset to fit your examples"),
    ("pass --data FILE (.jsonl, .json or .parquet)", "choose a dataset (.jsonl, .json or .parquet)"),
    ("--no-grad-checkpointing", "Checkpointing “off”"),
    ("--grad-checkpointing", "Checkpointing “on”"),
    ("--offload-checkpoints", "Checkpointing “on, long context”"),
    ("--layer-tile", "Checkpointing “on, long context”"),
    ("--mlp-tile", "MLP tiles"),
    ("--seq-len", "Sequence length"),
    ("--batch 1", "Micro-batch 1"),
    ("--batch", "Micro-batch"),
    ("--grad-accum", "Accumulation"),
    ("--rank", "LoRA rank"),
    ("--quantize 4bit or auto", "Base weights “4-bit” or “auto”"),
    ("--quantize none", "Base weights “unquantised”"),
    ("--quantize 4bit", "Base weights “4-bit”"),
    ("--quantize", "Base weights"),
    ("--packing", "Packing “on”"),
    ("--max-steps", "Max steps"),
    ("--epochs", "Epochs"),
    ("--lr", "Learning rate"),
    ("--skip-bad", "“Skip bad rows”"),
    ("--val-split", "the held-out share"),
    ("--eval-split", "the held-out share"),
    ("--eval-data", "an eval file"),
    ("--preset 24gb", "a memory preset"),
    ("--preset", "the memory preset"),
    ('--gpu "', 'a card in the memory list ("'),
    ("--gpu", "a card in the memory list"),
    ("--gpus 1", "one GPU"),
    ("--gpus", "the GPU count"),
    ("--attention sdpa", "the standard attention (SDPA)"),
    ("--attention auto", "automatic attention"),
    ("--attention", "the attention choice"),
    ("--loss-kernel auto", "the automatic loss"),
    ("--loss-kernel", "the loss choice"),
    ("--trust-remote-code", "“Trust the model's code”"),
    ("--allow-pickle", "“Allow pickle files”"),
    ("--download", "the download button"),
    ("--merge-into", "“Merge into”"),
    ("--force", "“Replace”"),
    ("--out", "the folder"),
    ("--quant", "the quantization"),
    ("--strategy", "the multi-GPU strategy"),
]
PIP = re.compile(r"\(?pip install (?:-U )?\"?([A-Za-z0-9_.\-]+(?:\[[a-z,]+\])?)\"?\)?")
COMMAND_LINE = re.compile(r"(?<![\w/.-])--[a-z][a-z-]+|pip install|`[^`]+`")


def plain(text: str) -> str:
    """`text` with the command line's flags and pip commands in the window's words."""
    if "--" not in text and "pip install" not in text and "`" not in text:
        return text
    text = PIP.sub(lambda m: f"(install the Python package {m[1]})" if m[0].startswith("(")
                   else f"install the Python package {m[1]}", text)
    for flag, words in FLAGS:
        text = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", words, text)
    return text.replace("`", "")


def command_line_words(text: str) -> list[str]:
    """The flags, pip commands and `code` left in `text` (none, in a label of the window)."""
    return COMMAND_LINE.findall(text)
