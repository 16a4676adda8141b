"""The model-agnostic layer: everything every model family (the ViTok tokenizer, the DiT) trains,
shards, checkpoints and measures with. Nothing here imports a model family; a family plugs in
through a `vitok.core.task.Task` (see `tests/test_layering.py`)."""
