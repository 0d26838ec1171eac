"""Progress bars: on a terminal when asked for, never in a redirected log."""

import io

from tqdm.auto import tqdm

from prlhf.progress import bar_disabled


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def drawn(show: bool, out: io.StringIO) -> str:
    for _ in tqdm(range(3), desc="steps", file=out, disable=bar_disabled(show), mininterval=0):
        pass
    return out.getvalue()


def test_bars_show_on_a_terminal_only_and_only_when_asked():
    assert "steps" in drawn(True, Terminal())
    assert drawn(True, io.StringIO()) == ""  # a log file: no carriage-return lines
    assert drawn(False, Terminal()) == ""
