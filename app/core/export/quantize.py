"""GGUF quantisation types: which this machine can write, and llama.cpp's own quantizer for the
K-quants (q4_k_m and friends), which we never reimplement.

Our writer (gguf.py, through the `gguf` package) writes f32, f16, bf16, q8_0, q4_0 and q5_0 anywhere.
The K-quants need `llama-cpp-python` (the optional extra `tunesmith[gguf]`): the model is written
once at 16 bits beside the target, and `llama_model_quantize` turns it into the K-quant file. The
quantizer runs in a child process so that a cancel can stop it at once and a crash inside llama.cpp
cannot take the app down with it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from app.core.errors import ExportError
from app.core.portable import child_env, python_command

# ours: what the gguf package can write (name -> GGML type name)
WRITTEN = {"f16": "F16", "bf16": "BF16", "f32": "F32", "q8_0": "Q8_0", "q5_0": "Q5_0", "q4_0": "Q4_0"}
# llama.cpp's: name -> its llama_ftype constant
BY_LLAMA_CPP = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
ALL_QUANTS = ("f16", "q8_0", "bf16", "f32", "q6_k", "q5_k_m", "q4_k_m", "q5_0", "q4_0")
# file bytes per parameter (an 8B model: 16.1 GB at f16, 8.5 GB at q8_0, 4.9 GB at q4_k_m)
BYTES_PER_PARAM = {"f16": 2.0, "bf16": 2.0, "f32": 4.0, "q8_0": 34 / 32, "q6_k": 0.82, "q5_k_m": 0.71,
                   "q4_k_m": 0.61, "q5_0": 22 / 32, "q4_0": 18 / 32}
DESCRIPTION = {"f16": "16-bit, lossless for a 16-bit model", "bf16": "16-bit bfloat", "f32": "32-bit",
               "q8_0": "8-bit, near lossless", "q6_k": "6-bit K-quant", "q5_k_m": "5-bit K-quant",
               "q4_k_m": "4-bit K-quant, Ollama's usual default", "q5_0": "5-bit, no llama.cpp needed",
               "q4_0": "4-bit, no llama.cpp needed"}
EXTRA = "pip install 'tunesmith[gguf]'"


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def quant_problem(quant: str) -> str:
    """Why this machine cannot write `quant` ("" when it can)."""
    if quant in WRITTEN:
        return ""
    if quant in BY_LLAMA_CPP:
        return "" if llama_cpp_installed() else \
            f"{quant} needs llama.cpp's quantizer (llama-cpp-python); install it with {EXTRA}"
    return f"unknown --quant '{quant}'; use one of {', '.join(ALL_QUANTS)}"


def check_quant(quant: str) -> None:
    problem = quant_problem(quant)
    if problem:
        raise ExportError(problem)


def llama_quantize(source: Path, target: Path, quant: str,
                   progress: Callable[[str, float], None] | None = None, threads: int = 0) -> None:
    """Quantise the GGUF file `source` into `target` with llama.cpp (`quant` one of BY_LLAMA_CPP).
    `progress(message, fraction)` is called about twice a second; an exception it raises stops
    the quantizer and is raised again. `target` is complete when this returns, absent otherwise."""
    check_quant(quant)
    report = progress or (lambda message, fraction: None)
    threads = threads or max(1, os.cpu_count() or 1)
    command = python_command("-m", "app.core.export.quantize", str(source), str(target), quant, str(threads))
    size = max(1, Path(source).stat().st_size)
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env())
        try:
            said = ""
            while child.poll() is None:
                done = target.stat().st_size / (size * BYTES_PER_PARAM[quant] / 2) if target.exists() else 0.0
                message = f"Quantising to {quant} with llama.cpp: about {min(0.99, done):.0%} written"
                if message != said:  # a line when it moves, not every half second
                    report(message, min(0.99, done))
                    said = message
                time.sleep(0.5)
        except BaseException:
            child.kill()
            child.wait()
            target.unlink(missing_ok=True)
            raise
        if child.returncode != 0:
            target.unlink(missing_ok=True)
            log.seek(0)
            lines = [line.strip() for line in log.read().splitlines() if line.strip()]
            raise ExportError(f"llama.cpp could not quantise {Path(source).name} to {quant} "
                              f"({lines[-1][:200] if lines else f'exit code {child.returncode}'})")
    report(f"Quantised to {quant}", 1.0)


def _quantize_in_this_process(source: str, target: str, quant: str, threads: int) -> int:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, BY_LLAMA_CPP[quant])
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
    if code != 0:
        print(f"llama_model_quantize returned {code}", file=sys.stderr)
    return 1 if code else 0


if __name__ == "__main__":  # the child process of llama_quantize
    sys.exit(_quantize_in_this_process(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
