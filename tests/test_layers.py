"""The package's layers import only downward (README, "Layout"). The imports are read from the source, function-level
imports included, so a lazy import cannot hide an upward arrow."""

import ast
from pathlib import Path

import prlhf

# Lowest first. A module may import its own layer's package and any layer below it; the foundation's modules may
# import each other, packages that share any other rank may not.
LAYERS = [
    ("config", "safe_io", "progress"),  # foundation: typed configs, crash-safe file writes, progress bars
    ("data",),      # records, loading, validation, task builders, tokenization, the collator
    ("users",),     # user models (each kind's row semantics) and the id registry
    ("model",),     # personalized LM and reward model, loading, log-probs, the batched scoring passes
    ("losses",),    # pure functions
    ("runs",),      # the run directory: versions, save, load, per-user row edits as file operations
    ("train",),     # the loop, optimizer, checkpoints, reference cache, few-shot adaptation of new users
    ("evaluate",),  # per-user metrics on a run, generation, reward scoring, reports and plots
    ("serve",),     # the OpenAI-compatible server over a run, and the export for other serving engines
    ("bench",),     # the benchmarks, the methods they compare and the runner that trains them
    ("demo",),      # `prlhf demo`, on the benchmarks' runner
    ("cli",),
    ("__main__",),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
SOURCE = Path(prlhf.__file__).parent


def top_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""  # "" = the package's own __init__ (its version string)


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every prlhf module that `path` imports, anywhere in the file (absolute or relative imports)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
    return {m for m in found if m == "prlhf" or m.startswith("prlhf.")}


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(SOURCE.rglob("*.py")):
        source = top_package(module_name(path))
        for target in sorted(imported_modules(path)):
            dest = top_package(target)
            if dest in ("", source):
                continue
            if RANK[dest] > RANK[source] or (RANK[dest] == RANK[source] and RANK[source] != 0):
                problems.append(f"{path.relative_to(SOURCE.parent)}: {source} (layer {RANK[source]}) imports "
                                f"{target} (layer {RANK[dest]})")
    return problems


def test_every_top_level_module_has_a_layer():
    names = {top_package(module_name(p)) for p in SOURCE.rglob("*.py")} - {""}
    assert names - set(RANK) == set(), "place the new package or module in LAYERS (and README's Layout)"


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "prlhf"
    (fake / "data").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "data" / "__init__.py").write_text("")
    (fake / "data" / "tokens.py").write_text("def f():\n    from prlhf.model.logprobs import IGNORE_INDEX\n")
    (fake / "train").mkdir()
    (fake / "train" / "loop.py").write_text("from ..data import tokens\n")  # relative and downward: fine
    monkeypatch.setattr(__import__(__name__), "SOURCE", fake)
    assert upward_imports() == ["prlhf/data/tokens.py: data (layer 1) imports prlhf.model.logprobs (layer 3)"]


def test_the_config_lists_exactly_the_user_model_kinds():
    from prlhf.config import USER_MODELS
    from prlhf.users.models import KINDS

    assert tuple(KINDS) == USER_MODELS
