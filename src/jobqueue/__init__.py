"""jobqueue: slow work behind HTTP, on worker threads behind bounded queues.

What a job kind uses, and all it imports from jobqueue (kept stable; see docs/kinds.md):

    from jobqueue import JobKind, JobContext, Output, BadInput, TooLarge, UnsupportedInput, \\
        Batch, Retry, RetryLater, run_child

Each name is imported when it is first asked for, so `import jobqueue.client` on a client
machine loads none of the server's settings.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobqueue.errors import BadInput, JobCancelled, RetryLater, TooLarge, UnsupportedInput
    from jobqueue.jobs import Batch, JobContext, JobKind, Output, Progress, Retry
    from jobqueue.processes import ChildSlots, OutputTooLarge, ProcessFailed, start_child
    from jobqueue.processes import output as child_output
    from jobqueue.processes import run as run_child
    from jobqueue.processes import run_many as run_children
    from jobqueue.settings import Settings

# Public name: (module, its name there).
_PUBLIC = {
    "BadInput": ("jobqueue.errors", "BadInput"),
    "JobCancelled": ("jobqueue.errors", "JobCancelled"),
    "RetryLater": ("jobqueue.errors", "RetryLater"),
    "TooLarge": ("jobqueue.errors", "TooLarge"),
    "UnsupportedInput": ("jobqueue.errors", "UnsupportedInput"),
    "Batch": ("jobqueue.jobs", "Batch"),
    "JobContext": ("jobqueue.jobs", "JobContext"),
    "JobKind": ("jobqueue.jobs", "JobKind"),
    "Output": ("jobqueue.jobs", "Output"),
    "Progress": ("jobqueue.jobs", "Progress"),
    "Retry": ("jobqueue.jobs", "Retry"),
    "ChildSlots": ("jobqueue.processes", "ChildSlots"),
    "OutputTooLarge": ("jobqueue.processes", "OutputTooLarge"),
    "ProcessFailed": ("jobqueue.processes", "ProcessFailed"),
    "child_output": ("jobqueue.processes", "output"),
    "start_child": ("jobqueue.processes", "start_child"),
    "run_child": ("jobqueue.processes", "run"),
    "run_children": ("jobqueue.processes", "run_many"),
    "Settings": ("jobqueue.settings", "Settings"),
}
__all__ = [
    "BadInput",
    "Batch",
    "ChildSlots",
    "JobCancelled",
    "JobContext",
    "JobKind",
    "Output",
    "OutputTooLarge",
    "ProcessFailed",
    "Progress",
    "Retry",
    "RetryLater",
    "Settings",
    "TooLarge",
    "UnsupportedInput",
    "child_output",
    "run_child",
    "run_children",
    "start_child",
]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'jobqueue' has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # asked once
    return value


def __dir__() -> list[str]:
    return [*globals(), *__all__]
