"""Planning a run before anything loads: presets, cards, the memory estimator and the planner."""
