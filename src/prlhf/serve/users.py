"""The user table a server answers with, and its live reload.

`prlhf adapt` and `prlhf users ...` commit a new version of a run atomically (prlhf.runs.directory). The server
polls run.json; when the version changes and the new one keeps the same LM (adapter, tokenizer, base, and the
user model's shape and shared parameters may change), it loads the new rows and swaps them in with one reference
assignment. A batch reads the table once, when it starts, so requests in flight finish on the version they
started with.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from prlhf.runs.directory import RunError, read_pointer, resolve_run
from prlhf.runs.users import table_of
from prlhf.safe_io import MANIFEST
from prlhf.users.models import UserModel
from prlhf.users.registry import GENERIC_INDEX, CompactRegistry, UserRegistry

logger = logging.getLogger(__name__)

# what must not change for rows to be swapped in under a running LM
LM_FILES = ("adapter/", "tokenizer/", "config.yaml", "value_head.safetensors")


@dataclass(frozen=True)
class UserSnapshot:
    model: UserModel
    registry: CompactRegistry
    version: str | None

    @property
    def nbytes(self) -> int:
        """Memory of the table: the user model's tensors and the id registry."""
        tensors = sum(t.nbytes for t in self.model.state_dict().values())
        return tensors + self.registry.nbytes

    def index(self, user_id: str | None) -> tuple[int, bool]:
        """(row, known): an id the table does not hold gets the generic user, never another user's row."""
        if user_id is None or user_id not in self.registry:
            return GENERIC_INDEX, False
        return self.registry.index(user_id), True


def lm_identity(files: Path) -> dict:
    """The sha256 of every file of a version that the LM is built from (plus the base it was saved with)."""
    path = files / MANIFEST
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text())
    shas = {name: entry.get("sha256") for name, entry in manifest.get("files", {}).items()
            if name.startswith(LM_FILES)}
    return {"files": shas, "base": manifest.get("base_manifest_sha256")}


class ServedUsers:
    """Holds the current UserSnapshot of a run and replaces it when the run commits a new version."""

    def __init__(self, run_dir: str | Path | None, user_model: UserModel, registry: UserRegistry, device="cpu"):
        """`run_dir` None: a model held in memory only, never reloaded."""
        self.device, self.reloads = device, 0
        self._lock = threading.Lock()  # one reload at a time
        self._refused: set[str] = set()  # versions that change the LM: warned about once
        version = None
        self.root, self.follows = None, False
        if run_dir is not None:
            run = resolve_run(run_dir)
            self.root, version = run.root, run.version
            # an explicit version folder (RUN/versions/vN) is served as is; a run directory follows its run.json
            self.follows = Path(run_dir).resolve() == run.root.resolve() and run.version is not None
            self._identity = lm_identity(run.files)
        self.current = UserSnapshot(user_model, compact(registry), version)

    def snapshot(self) -> UserSnapshot:
        return self.current  # a plain attribute read: atomic, and the snapshot itself never changes

    def reload_if_changed(self) -> bool:
        """Swap in the run's current version when it changed; True when it did. A version that changes the LM
        is not served (it needs a restart); a damaged one is skipped with a warning and retried next time."""
        if not self.follows:
            return False
        with self._lock:
            pointer = read_pointer(self.root) or {}
            version = pointer.get("version")
            if version is None or version == self.current.version or version in self._refused:
                return False
            try:
                run = resolve_run(self.root)
                if lm_identity(run.files) != self._identity:
                    logger.warning("%s: version %s changes the LM itself; restart the server to serve it "
                                   "(still serving the user table of %s)", self.root, version, self.current.version)
                    self._refused.add(version)
                    return False
                table = table_of(run)  # the version just checked, read once
            except (RunError, OSError, ValueError) as exc:
                logger.warning("%s: could not load version %s (%s); still serving %s", self.root, version, exc,
                               self.current.version)
                return False
            model = table.to_module().to(self.device).eval().requires_grad_(False)
            registry = compact(table.registry)
            del table
            self.current = UserSnapshot(model, registry, run.version)
            self.reloads += 1
            release_freed_memory()  # the parsed users.json, freed above
            logger.info("%s: now serving the user table of version %s (%d users)", self.root, run.version,
                        len(registry))
            return True


def compact(registry: UserRegistry | CompactRegistry) -> CompactRegistry:
    return registry if isinstance(registry, CompactRegistry) else CompactRegistry.of(registry)


def release_freed_memory() -> None:
    """Hand the heap that a large users.json left behind back to the OS (glibc keeps it otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused by the process instead
        pass


def watch(users: ServedUsers, interval: float, stop: threading.Event, on_reload=lambda: None) -> threading.Thread:
    """Poll for new versions every `interval` seconds until `stop` is set."""
    def loop():
        while not stop.wait(interval):
            try:
                if users.reload_if_changed():
                    on_reload()
            except Exception:  # a reload must never take the server down
                logger.exception("user table reload failed")

    thread = threading.Thread(target=loop, name="prlhf-user-reload", daemon=True)
    thread.start()
    return thread


