"""Talk to a trained adapter: load base (4-bit) + adapter once, answer with or without the adapter.

The adapter can be switched off without reloading, so the base model's answer to the same prompt
is one call away.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.core.errors import RunError


@dataclass
class ChatModel:
    """A loaded base model with its adapter, and the tokenizer (with the chat template trained on)."""

    model: object
    tokenizer: object
    device: str

    def reply(self, messages: list[dict], adapter: bool = True, max_new_tokens: int = 120,
              temperature: float = 0.0, top_p: float = 1.0) -> str:
        """The assistant's next turn for `messages` (greedy when temperature is 0)."""
        import torch

        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 \
            else {"do_sample": False}
        generate = dict(max_new_tokens=max_new_tokens, repetition_penalty=1.1,
                        pad_token_id=self.tokenizer.pad_token_id, **sampling)
        with torch.no_grad():
            if adapter:
                output = self.model.generate(**inputs, **generate)
            else:
                with self.model.disable_adapter():
                    output = self.model.generate(**inputs, **generate)
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def load_chat_model(base_path: str | Path, adapter_dir: str | Path, trust_remote_code: bool = False) -> ChatModel:
    """Base model in 4-bit plus the PEFT adapter in `adapter_dir` (with its saved tokenizer)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from app.core.models import load_model_4bit, resolve_model
    from app.core.planner import detect_device

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise RunError(f"{adapter_dir}: no adapter_config.json; is the run finished?")
    device, dtype, _ = detect_device()
    info = resolve_model(str(base_path), trust_remote_code)
    base = load_model_4bit(info, getattr(torch, dtype), device, trust_remote_code)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ChatModel(model, tokenizer, device)
