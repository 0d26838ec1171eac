"""Writing files so that a kill or a full disk never leaves a half-written one where a reader looks.

- Temporary files and folders are created exclusively, at unpredictable names (`mkstemp` / `mkdtemp` in the
  target folder, names starting with TMP_PREFIX), and moved into place with one `os.replace` / `os.rename`
  after their contents are fsynced. A rename replaces a symlink planted at the target; it never follows it.
- `folder_lock` takes an exclusive `flock` on the folder itself (no lock file to leave behind); the kernel
  drops it when the process dies.
- `build_manifest` / `manifest_problem`: every file of a folder with its size and sha256, and the check of a
  folder against it.
- `fault_point` is the fault-injection hook the tests use: every write, rename and removal of a multi-file
  change calls it first. With PRLHF_FAULT_AT=N the N-th call in this process (counting only the scopes listed
  in PRLHF_FAULT_SCOPE, when set) ends the process at once with `os._exit(137)`, as a SIGKILL would, or with
  PRLHF_FAULT_KIND=enospc raises OSError(ENOSPC), as a full disk would. Unset, it does nothing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".prlhf-tmp-"
_fault_calls = 0


def fault_point(scope: str, what: str) -> None:
    """The test hook described in the module docstring; `scope` names the operation ("version", "base",
    "checkpoint", "file"), `what` the step (shown when the fault fires)."""
    target = os.environ.get("PRLHF_FAULT_AT")
    if not target:
        return
    scopes = os.environ.get("PRLHF_FAULT_SCOPE")
    if scopes and scope not in scopes.split(","):
        return
    global _fault_calls
    _fault_calls += 1
    if _fault_calls != int(target):
        return
    print(f"prlhf-fault: point {_fault_calls} ({scope}: {what})", file=sys.stderr, flush=True)
    if os.environ.get("PRLHF_FAULT_KIND") == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)
    os._exit(137)


# ------------------------------------------------------------------------------------------ durable writes


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (and `root`), innermost first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def atomic_write_bytes(path: Path, data: bytes, scope: str = "file") -> None:
    """Write `path` through an exclusive temporary file in its folder: a reader sees the old file or the new."""
    path = Path(path)
    fault_point(scope, f"write {path.name}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX + path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file gets ordinary permissions
        fault_point(scope, f"replace {path.name}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str, scope: str = "file") -> None:
    atomic_write_bytes(path, text.encode("utf-8"), scope)


def atomic_write_json(path: Path, data, scope: str = "file") -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n", scope)


def make_temp_dir(parent: Path, label: str) -> Path:
    """An exclusive, private-named temporary folder in `parent`, with ordinary permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{label}-", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
    return tmp


@contextmanager
def held_temp_dir(parent: Path, label: str) -> Iterator[Path]:
    """`make_temp_dir`, locked (flock) while the block runs: a process killed meanwhile leaves the folder behind,
    but unlocked, so `remove_stale_temp_dirs` can tell it from one that another process is still building."""
    import fcntl

    tmp = make_temp_dir(parent, label)
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the lock stays with the folder when the block renames it
        yield tmp
    finally:
        os.close(fd)


def remove_stale_temp_dirs(parent: Path, label: str) -> list[Path]:
    """Remove the `held_temp_dir(parent, label)` folders that no live process holds (left by a kill)."""
    import fcntl

    removed = []
    for tmp in sorted(Path(parent).iterdir()):
        if not tmp.name.startswith(f"{TMP_PREFIX}{label}-") or tmp.is_symlink() or not tmp.is_dir():
            continue
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # being built right now
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        finally:
            os.close(fd)
    return removed


def remove_path(path: Path, scope: str = "file") -> None:
    """Remove a file, a symlink (never what it points to) or a folder tree; nothing if it does not exist."""
    if not os.path.lexists(path):
        return
    fault_point(scope, f"remove {Path(path).name}")
    if Path(path).is_dir() and not Path(path).is_symlink():
        shutil.rmtree(path)
    else:
        os.unlink(path)


def rename(src: Path, dst: Path, scope: str = "file") -> None:
    fault_point(scope, f"rename {Path(src).name} -> {Path(dst).name}")
    os.rename(src, dst)


def copy_file(src: Path, dst: Path, scope: str = "file") -> None:
    """Copy the contents of a regular file (not through a symlink) into a new file `dst`."""
    fault_point(scope, f"copy {Path(src).name}")
    if Path(src).is_symlink():
        raise OSError(errno.ELOOP, "refusing to copy through a symlink", str(src))
    with open(src, "rb") as f_in, open(dst, "xb") as f_out:  # "x": created exclusively
        shutil.copyfileobj(f_in, f_out)


def copy_tree(src: Path, dst: Path, scope: str = "file") -> None:
    """Copy a folder of regular files (symlinks refused) into the new folder `dst`."""
    os.mkdir(dst)
    for entry in sorted(Path(src).iterdir()):
        if entry.is_symlink():
            raise OSError(errno.ELOOP, "refusing to copy through a symlink", str(entry))
        if entry.is_dir():
            copy_tree(entry, dst / entry.name, scope)
        else:
            copy_file(entry, dst / entry.name, scope)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------ locking


@contextmanager
def folder_lock(folder: Path, error: Callable[[str], Exception], what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (which must exist) or raise `error(message)` at once if another
    process holds it. POSIX only (flock); the atomic writes do not depend on it."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise error(f"{folder}: another prlhf process is writing it right now ({what} needs it to itself); "
                        "wait for that one to finish, or choose another folder") from None
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- manifests

MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_files(root: Path) -> list[str]:
    """Relative paths of the files under `root` (the manifest excepted), sorted; a symlink is an error."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            if (Path(folder) / name).is_symlink():
                raise OSError(errno.ELOOP, "symlink in a prlhf folder", str(Path(folder) / name))
        found += [str((Path(folder) / name).relative_to(root)) for name in files]
    return sorted(f for f in found if f != MANIFEST)


def build_manifest(root: Path, **extra) -> dict:
    """{"files": {relative path: {"size", "sha256"}}, **extra} for every file under `root`."""
    files = {rel: {"size": (root / rel).stat().st_size, "sha256": file_sha256(root / rel)}
             for rel in folder_files(root)}
    return {"format": "prlhf-manifest/1", "files": files, **extra}


def manifest_problem(root: Path) -> str | None:
    """None when `root` holds exactly the files of its manifest, unchanged; else what is wrong, in a few words."""
    path = root / MANIFEST
    if not path.is_file():
        return f"{MANIFEST} is missing"
    try:
        manifest = json.loads(path.read_text())
        listed = manifest["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable"
    try:
        present = folder_files(root)
    except OSError as exc:
        return f"{exc.filename}: {exc.strerror}"
    missing, extra = sorted(set(listed) - set(present)), sorted(set(present) - set(listed))
    if missing:
        return f"{missing[0]} is missing"
    if extra:
        return f"{extra[0]} is not in its manifest"
    for rel, entry in listed.items():
        size = (root / rel).stat().st_size
        if size != entry["size"]:
            return f"{rel} has {size} bytes, its manifest says {entry['size']}"
        if file_sha256(root / rel) != entry["sha256"]:
            return f"{rel} does not match its manifest's sha256"
    return None


def write_manifest(root: Path, scope: str, **extra) -> dict:
    """Write `root`/manifest.json (listing every other file) and fsync the whole folder."""
    manifest = build_manifest(root, **extra)
    fault_point(scope, f"write {MANIFEST}")
    with open(root / MANIFEST, "x") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
    fsync_tree(root)
    return manifest


# -------------------------------------------------------------------------------------- what we may write

# Entries a run directory holds at its top level (prlhf.runs.directory); a data folder written by `prlhf data
# build` holds none of the markers.
RUN_MARKERS = ("run.json", "versions", "checkpoints", "config.yaml", "base")
RUN_NAMES = RUN_MARKERS + ("metrics.jsonl", "eval.jsonl", "adapter", "tokenizer", "users.json", "user_model.json",
                           "user_model.safetensors", "value_head.safetensors", "adapt.json", MANIFEST)


def looks_like_run(folder: Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any(os.path.lexists(folder / name) for name in RUN_MARKERS)


def output_file_problem(path: Path, overwrite: bool, ours: Callable[[Path], bool]) -> str | None:
    """Why `path` must not be written by a command that writes one file there (None: it may).

    Refused always: a folder or a symlink at `path`, a run directory's own file name inside a run, or a path
    inside a run's versions/checkpoints/base. Refused unless `overwrite`: an existing file that `ours(path)` does
    not recognise as this command's own output."""
    path = Path(path)
    if path.is_symlink():
        return "is a symlink (prlhf does not write through symlinks)"
    if path.is_dir():
        return "is a folder, not a file"
    parent = path.parent
    if looks_like_run(parent) and path.name in RUN_NAMES:
        return f"is the run directory {parent}'s own {path.name}"
    if _inside_run_internals(parent):
        return "is inside a run directory's own files"
    if path.exists() and not overwrite and not ours(path):
        return "already exists and was not written by this command (pass --overwrite to replace it)"
    return None


def _inside_run_internals(folder: Path) -> bool:
    folder = Path(os.path.abspath(folder))
    for child, parent in zip([folder, *folder.parents], folder.parents):
        if child.name in ("versions", "checkpoints", "base") and looks_like_run(parent):
            return True
    return False


# ------------------------------------------------------------------------------------------ results folders

RESULTS_MARKER = ".prlhf-bench"  # {"bench": name}, written first into a benchmark's results folder
HAND_WRITTEN = ("COMMAND.md",)  # what a person adds beside committed results (benchmarks/results/*)


def results_folder_problem(folder: Path, bench: str, names: tuple[str, ...]) -> str | None:
    """Why benchmark `bench`, which writes the entries `names` (its results file first; it removes its own
    `work`), must not use `folder` (None: it may). Allowed: a new or empty folder, one this benchmark marked, or
    an unmarked one holding its results file and only entries it writes (results from before the marker).
    Everything else may be someone's data, and is refused."""
    folder = Path(folder)
    if folder.is_symlink():
        return "is a symlink (prlhf does not write through symlinks)"
    if not folder.exists():
        return "is inside a run directory's own files" if _inside_run_internals(folder.parent) else None
    if not folder.is_dir():
        return "is a file, not a folder"
    if looks_like_run(folder) or _inside_run_internals(folder):
        return "is a run directory (or inside one); a benchmark writes its own folder"
    marker = folder / RESULTS_MARKER
    if marker.is_file():
        try:
            owner = json.loads(marker.read_text())["bench"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            owner = None
        return None if owner == bench else f"holds the results of another benchmark ({owner}); choose another folder"
    present = [p.name for p in folder.iterdir() if not p.name.startswith(TMP_PREFIX)]
    foreign = sorted(set(present) - set(names + HAND_WRITTEN))
    if foreign:
        return f"is not empty and holds {foreign[0]!r}, which bench {bench} does not write; choose a new folder"
    if present and names[0] not in present:  # e.g. a lone `work` folder: nothing says a benchmark made it
        return f"is not empty and holds no {names[0]} of bench {bench}; choose a new folder"
    return None


@contextmanager
def results_folder(folder: Path, bench: str, names: tuple[str, ...]) -> Iterator[Path]:
    """Check `folder` (`results_folder_problem`, raising ValueError), create it, mark it as `bench`'s and hold
    its lock while the block runs (a second benchmark into the same folder is refused, not interleaved)."""
    folder = Path(folder)
    problem = results_folder_problem(folder, bench, names)
    if problem:
        raise ValueError(f"--out {folder} {problem}")
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder, ValueError, f"bench {bench}"):
        if not (folder / RESULTS_MARKER).is_file():
            atomic_write_json(folder / RESULTS_MARKER, {"bench": bench})
        yield folder
