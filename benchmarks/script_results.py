"""What the benchmark scripts that are not `prlhf bench` commands share: --out is checked with the bench commands'
rule before any work (a run directory or a folder holding someone else's files is refused in one line), held
while the script runs, and gets the JSON and the Markdown report written whole or not at all."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from prlhf.safe_io import atomic_write_text, results_folder, results_folder_problem


def measure_into_out(parser: argparse.ArgumentParser, args, bench: str, outputs: tuple[str, str],
                     measure: Callable[[object], tuple[dict, list[str]]]) -> None:
    """`measure(args)` -> (result, report lines), written to args.out as outputs = (JSON name, Markdown name)."""
    out = Path(args.out)
    problem = results_folder_problem(out, bench, outputs)
    if problem:
        parser.error(f"--out {args.out} {problem}")
    with results_folder(out, bench, outputs) as folder:
        result, lines = measure(args)
        atomic_write_text(folder / outputs[0], json.dumps(result, indent=1) + "\n")
        atomic_write_text(folder / outputs[1], "\n".join(lines) + "\n")
    print("\n".join(lines))
