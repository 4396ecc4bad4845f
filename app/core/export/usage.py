"""How to run what was exported: the exact commands for the folder just written (Ollama,
llama.cpp, LM Studio for a GGUF file; transformers for a merged model; PEFT for an adapter),
which the CLI prints after an export and the Export tab shows with a copy button each."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path


def quoted(path: str | Path) -> str:
    """A path as this machine's shell takes it (spaces and quotes included)."""
    text = str(path)
    if sys.platform == "win32":
        return f'"{text}"' if re.search(r'[\s&()^%!]', text) else text
    return shlex.quote(text)


def ollama_name(out_dir: Path) -> str:
    """A model name Ollama accepts (lower case letters, digits, '.', '_', '-'), from the folder's."""
    name = re.sub(r"[^a-z0-9._-]+", "-", out_dir.name.lower()).strip("-._")
    return name[:60] or "my-model"


def how_to_run(fmt: str, out_dir: str | Path, files: list[str]) -> list[tuple[str, str]]:
    """(what, command) pairs for the export in `out_dir` of format `fmt` holding `files`."""
    out = Path(out_dir)
    if fmt == "gguf":
        gguf = next((out / name for name in files if name.endswith(".gguf")), out / "model.gguf")
        pairs = []
        if "Modelfile" in files:
            name = ollama_name(out)
            pairs.append(("Ollama", f"ollama create {name} -f {quoted(out / 'Modelfile')} && ollama run {name}"))
        pairs += [("llama.cpp", f"llama-cli -m {quoted(gguf)} -cnv"),
                  ("LM Studio", f"lms import {quoted(gguf)}")]
        return pairs
    python = quoted(sys.executable)  # the Python Tunesmith runs in: it has transformers and peft
    if fmt == "merged":
        code = ("from transformers import pipeline; "
                f"chat = pipeline('text-generation', model={str(out)!r}); "
                "print(chat([{'role': 'user', 'content': 'Hello!'}], max_new_tokens=100)[0]['generated_text'][-1]['content'])")
    else:
        code = ("from peft import AutoPeftModelForCausalLM; from transformers import AutoTokenizer; "
                f"model = AutoPeftModelForCausalLM.from_pretrained({str(out)!r}); "
                f"tok = AutoTokenizer.from_pretrained({str(out)!r}); "
                "ids = tok.apply_chat_template([{'role': 'user', 'content': 'Hello!'}], add_generation_prompt=True, "
                "return_tensors='pt', return_dict=True); "
                "print(tok.decode(model.generate(**ids, max_new_tokens=100)[0][ids['input_ids'].shape[1]:], "
                "skip_special_tokens=True))")
    tool = "transformers" if fmt == "merged" else "PEFT (with the base model)"
    return [(tool, f"{python} -c {quoted(code) if sys.platform != 'win32' else chr(34) + code + chr(34)}")]
