"""The CLI's one error boundary: whatever a command raises reaches the user as one bounded line on stderr.

prlhf's own error types already say what went wrong and where (file, line, field) and are printed as they are;
anything else (OSError, JSON, safetensors, torch, PEFT, YAML, ...) is named by its type and message, with the
command's paths as the place, and `prlhf -v` prints its traceback.
"""

from __future__ import annotations

import argparse

OWN_MESSAGE_LIMIT = 1000  # ours embed values through short_repr; `unknown key` lists ~580 characters of keys
FOREIGN_MESSAGE_LIMIT = 500
# flags that name what a command reads or writes: the "where" of an error that does not say it itself
PATH_FLAGS = ("run", "data", "file", "config", "model", "known_data", "rerank", "out", "from")


def own_error_types() -> tuple[type[Exception], ...]:
    from prlhf.config import ConfigError
    from prlhf.data.schema import DataError
    from prlhf.model.presets import PresetError
    from prlhf.runs.directory import RunError
    from prlhf.train.loop import TrainingDiverged

    return DataError, ConfigError, RunError, PresetError, TrainingDiverged


def one_line(text: str, limit: int) -> str:
    """Whitespace (newlines included) collapsed to single spaces, cut to `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def command_name(args: argparse.Namespace) -> str:
    """'eval', 'data build', 'users export', ..."""
    words = [args.command]
    for key in ("data_command", "users_command", "bench_command"):
        if getattr(args, key, None):
            words.append(getattr(args, key))
    return " ".join(words)


def command_paths(args: argparse.Namespace) -> str:
    """`--run R --data D`: the paths the command was given."""
    given = [(name, getattr(args, name, None)) for name in PATH_FLAGS]
    return " ".join(f"--{name.replace('_', '-')} {value}" if name != "file" else str(value)
                    for name, value in given if isinstance(value, str) and value)


def foreign_message(exc: BaseException) -> str:
    """What went wrong, for an exception of another library: its type and message, OSError's file first."""
    if isinstance(exc, MemoryError):
        return "out of memory (MemoryError): use smaller sizes (--batch-size, --max-length) or a larger machine"
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        target = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return f"{exc.filename}{target}: {exc.strerror} ({type(exc).__name__})"
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid {exc.encoding} text (byte 0x{exc.object[exc.start]:02x} at position {exc.start})"
    return f"{type(exc).__name__}: {str(exc) or '(no message)'}"


def describe(exc: BaseException, args: argparse.Namespace, own: tuple[type[Exception], ...]) -> str:
    """The one line after `prlhf: error: `."""
    if isinstance(exc, own):
        return one_line(str(exc), OWN_MESSAGE_LIMIT)
    where = " ".join(filter(None, [command_name(args), command_paths(args)]))
    message = one_line(foreign_message(exc), FOREIGN_MESSAGE_LIMIT)
    return f"{message} (in `prlhf {one_line(where, 300)}`; `prlhf -v ...` prints the traceback)"
