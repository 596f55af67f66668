"""`make demo`: the demo dataset, the demo's fine-tuning job and its serving check (`python -m app.demo`)."""
