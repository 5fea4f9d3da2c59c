"""The engine: the scheduler decides what is ready, the task runner runs one task, the executor moves work between them."""

from runbook.engine.executor import Executor
from runbook.engine.options import ExecOptions, SavedPrediction

__all__ = ["ExecOptions", "Executor", "SavedPrediction"]
