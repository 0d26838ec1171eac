"""Built-in multi-user preference tasks, generated in-package (no downloads, seeded).

- `length`: conflicting length preferences (P-DPO paper, experiment 1).
- `style`: conflicting formality / layout / tone preferences.
- `persona`: users holding opposing persona traits, on real statements read from a local folder.
- `tldr`: real labelers (OpenAI's human comparisons of Reddit summaries), read from a local folder.
- `polis`: real participants' agree / disagree votes on each other's statements (Polis open data), read from a
  local folder.
"""

from __future__ import annotations

from typing import Callable

from prlhf.data.tasks.common import Task
from prlhf.data.tasks.length import build_length_task
from prlhf.data.tasks.persona import build_persona_task
from prlhf.data.tasks.polis import build_polis_task
from prlhf.data.tasks.style import build_style_task
from prlhf.data.tasks.tldr import build_tldr_task

# name -> builder; every builder takes keyword parameters (all defaulted, including `seed`) and returns a Task
TASKS: dict[str, Callable[..., Task]] = {"length": build_length_task, "style": build_style_task,
                                         "persona": build_persona_task, "tldr": build_tldr_task,
                                         "polis": build_polis_task}

__all__ = ["Task", "TASKS", "build_length_task", "build_persona_task", "build_polis_task", "build_style_task",
           "build_tldr_task"]
