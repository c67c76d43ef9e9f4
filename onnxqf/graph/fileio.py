"""Atomic writes: every output of onnxqf appears whole, or not at all.

One convention for every file and folder onnxqf writes (models and their data, genai folders,
tokenizer folders, inspect folders, plots, the ``--low-memory`` scratch tensors):

Rules:

- Work happens in a **scratch folder beside the destination** (same file system, so putting the
  result in place is a rename), named ``.onnxqf-partial-<pid>-...`` (:data:`PARTIAL_PREFIX`).
- On success the finished file or folder is renamed into place (:func:`atomic_file`,
  :func:`atomic_dir`). An existing folder at the destination is moved aside into the scratch folder
  first and dropped only once the new one is in place; if that rename fails it is put back.
- On any failure (an exception, Ctrl-C, the ``SystemExit`` the CLI raises for SIGTERM) the scratch
  folder is removed with what it holds: nothing partial is left.
- A process killed outright (SIGKILL, power loss) cannot clean up: the next write into the same
  folder removes the scratch folders whose process no longer exists (:func:`remove_stale_partials`;
  the pid in the name says whose they are).
- What is renamed into place is created with the process's umask (``mkdtemp``'s mode 0700 applies
  only to the scratch folder itself, which is never renamed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["PARTIAL_PREFIX", "atomic_dir", "atomic_file", "is_partial", "remove_stale_partials", "replace_dir",
           "scratch_dir"]

PARTIAL_PREFIX = ".onnxqf-partial-"


def is_partial(name: str) -> bool:
    """Whether ``name`` is a scratch folder of this convention (a folder that is never an output)."""
    return name.startswith(PARTIAL_PREFIX)


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike | None, tag: str = "") -> Iterator[Path]:
    """A new scratch folder in ``parent`` (created if missing; None: the system's temporary folder), removed
    with everything in it when the block ends, however it ends. Stale scratch folders of dead processes in
    ``parent`` are removed first."""
    if parent is not None:
        parent = Path(parent)
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(parent)
    prefix = f"{PARTIAL_PREFIX}{os.getpid()}-" + (f"{tag}-" if tag else "")
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a path (not yet created) to write ``path``'s content to; renamed onto ``path`` when the block
    succeeds, removed otherwise. The block must create the file."""
    path = Path(path).absolute()
    with scratch_dir(path.parent) as scratch:
        tmp = scratch / path.name
        yield tmp
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a new empty folder to fill; it replaces the folder ``target`` (or takes its place) when the
    block succeeds (:func:`replace_dir`), and is removed otherwise."""
    target = Path(target).absolute()
    with scratch_dir(target.parent) as scratch:
        new = scratch / "new"
        os.mkdir(new)  # honours the umask: this folder is the one renamed into place
        yield new
        replace_dir(new, target, scratch / "old")


def replace_dir(new: Path, target: Path, backup: Path) -> None:
    """Put the folder ``new`` at ``target``. An existing ``target`` is first moved to ``backup`` (on the same
    file system), put back if the rename fails, and removed after."""
    moved = False
    if target.exists():
        os.replace(target, backup)
        moved = True
    try:
        os.replace(new, target)
    except BaseException:
        if moved:
            os.replace(backup, target)
        raise
    if moved:
        shutil.rmtree(backup, ignore_errors=True)


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the ``.onnxqf-partial-<pid>-*`` folders in ``folder`` whose process is gone; returns them."""
    removed = []
    for entry in Path(folder).glob(f"{PARTIAL_PREFIX}*"):
        pid = entry.name[len(PARTIAL_PREFIX):].split("-", 1)[0]
        if entry.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True
