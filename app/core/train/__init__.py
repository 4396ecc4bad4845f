"""Training: prepare a run, the QLoRA step and its fast kernels, the loop, OOM back-off, events."""
