"""Models: what the user names (folder, cache, hub id, catalogue, demo), checked from files alone,
described by architecture facts, and loaded in 4-bit."""
