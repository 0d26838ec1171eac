"""Built-in synthetic multi-user preference tasks, generated in-package (no downloads, seeded).

- `length`: conflicting length preferences (P-DPO paper, experiment 1).
- `style`: conflicting formality / layout / tone preferences.
"""

from __future__ import annotations

from typing import Callable

from prlhf.data.tasks.common import Task
from prlhf.data.tasks.length import build_length_task
from prlhf.data.tasks.style import build_style_task

# name -> builder; every builder takes keyword parameters (all defaulted, including `seed`) and returns a Task
TASKS: dict[str, Callable[..., Task]] = {"length": build_length_task, "style": build_style_task}

__all__ = ["Task", "TASKS", "build_length_task", "build_style_task"]
