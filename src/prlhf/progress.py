"""Progress bars that show on a terminal and stay out of logs."""

from __future__ import annotations


def bar_disabled(show: bool) -> bool | None:
    """tqdm's `disable`: True when the caller asks for no bar; None otherwise, which tqdm reads as "only when the
    output is a terminal", so a redirected run writes no carriage-return lines into its log."""
    return None if show else True
