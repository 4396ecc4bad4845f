"""Ways a training step keeps less in memory, each the same result as without: tiled MLPs and
layers, checkpoints offloaded to host RAM, attention over packed rows, the loss without full logits."""
