"""The engine: models, data, planning, training, runs. Never imports Qt."""
