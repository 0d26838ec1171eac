"""Train a method, load its run: the step every benchmark and the demo repeat for each method they compare; and
the experiment record (OUT/experiment.yaml) a benchmark leaves so that it can be run again."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from prlhf.config import TrainConfig
from prlhf.runs.directory import LoadedRun, load_run
from prlhf.train.loop import train

logger = logging.getLogger(__name__)


@dataclass
class MethodRun:
    name: str
    run: LoadedRun
    summary: dict   # what `prlhf train` returned (steps, train_seconds, ...); run.json's for a reused run
    started: float  # time.time() when its training (or loading) began
    reused: bool = False


def train_method(name: str, base: TrainConfig, overrides: Mapping, run_dir: Path, show_progress: bool = False,
                 device: str = "cpu", reuse: bool = False) -> MethodRun:
    """`base` with the method's overrides, trained into `run_dir` (replacing an earlier run there), loaded.
    With `reuse`, a finished run already in `run_dir` that was trained with this very config is loaded instead
    (a killed benchmark goes on where it stopped); an unfinished or different one is trained again."""
    cfg = replace(base, out=str(run_dir), **overrides)
    started = time.time()
    if reuse and (run_dir / "run.json").is_file():
        run = load_run(run_dir, device=device)
        if asdict(run.config) == asdict(cfg):
            logger.info("reusing the finished run %s", run_dir)
            return MethodRun(name, run, json.loads((run_dir / "run.json").read_text()), started, reused=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = train(cfg, show_progress=show_progress)
    return MethodRun(name, load_run(run_dir, device=device), summary, started)


def train_on_one_base(base: TrainConfig, methods: Mapping[str, Mapping], runs_dir: Path,
                      show_progress: bool = False) -> Iterator[MethodRun]:
    """Each method in turn, into runs_dir/NAME. The first one warms up the base (`base.sft_steps`) and saves it
    as its RUN/base; the others start from that base without a warm-up, so every method is compared on the same
    LM (same data, same seed). Yields each run as it finishes: a caller that writes after each keeps what
    finished if it is killed."""
    shared = None
    for name, overrides in methods.items():
        cfg = base if shared is None else replace(base, model=shared, sft_steps=0)
        yield train_method(name, cfg, overrides, runs_dir / name, show_progress)
        shared = shared or str(runs_dir / name / "base")


# ------------------------------------------------------------------------------------------ experiment records

EXPERIMENT_FILE = "experiment.yaml"
EXPERIMENT_FORMAT = "prlhf-experiment/1"


def experiment_yaml(bench: str, arguments: Mapping, command: str, version: str) -> str:
    """The record a benchmark leaves beside its results: the command in its header, then what `prlhf bench rerun`
    needs to run it again (the benchmark and its arguments, as the CLI resolved them)."""
    import yaml

    plain = json.loads(json.dumps(dict(arguments)))  # tuples -> lists, Paths refused: only plain values travel
    body = yaml.safe_dump({"format": EXPERIMENT_FORMAT, "bench": bench, "prlhf": version, "arguments": plain},
                          sort_keys=False)
    return f"# {command}\n# again, into a new folder: prlhf bench rerun THIS_FILE --out NEW_FOLDER\n{body}"


def read_experiment(path: Path) -> tuple[str, dict]:
    """(bench, arguments) of an experiment record; ValueError, naming the file, for anything else."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not a readable experiment record ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPERIMENT_FORMAT:
        raise ValueError(f"{path}: not an experiment record (no format {EXPERIMENT_FORMAT!r}; benchmarks write "
                         f"OUT/{EXPERIMENT_FILE})")
    if not isinstance(doc.get("bench"), str) or not isinstance(doc.get("arguments"), dict):
        raise ValueError(f"{path}: an experiment record needs 'bench' (a name) and 'arguments' (a mapping)")
    return doc["bench"], doc["arguments"]
