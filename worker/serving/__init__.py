"""Serving engine: continuous batching over one base model with many LoRA adapters, and its HTTP server.

Pure library like `worker/training`: imports nothing from `app`. The launcher (`worker/serve_main.py`)
does the I/O (settings, database, blob storage) and hands the engine an `AdapterSource`.
"""
