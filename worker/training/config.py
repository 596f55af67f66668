"""The training core's view of a run's configuration: the shared `FinetuningConfig`, by its training name.

The model itself lives in the thin client package (`tuneforge.config`) so that the client, the
control plane's 422s and the worker apply one set of rules; see that module.
"""

from tuneforge.config import FinetuningConfig

TrainingConfig = FinetuningConfig

__all__ = ["TrainingConfig"]
