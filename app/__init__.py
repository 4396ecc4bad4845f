"""Tunesmith: fine-tune an open LLM on your own GPU with QLoRA."""

__version__ = "0.1.0"
