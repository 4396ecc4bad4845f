"""GPU facts and live readings through NVML (no Qt, no torch needed)."""
