"""A run on several processes: torchrun-style launch, the worker, DDP and FSDP2 (sharded)."""
