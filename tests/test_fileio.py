"""onnxqf.graph.fileio: outputs appear whole or not at all; scratch folders go, stale ones of dead processes too."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from onnxqf.graph.fileio import PARTIAL_PREFIX, atomic_dir, atomic_file, remove_stale_partials, scratch_dir


def test_atomic_file(tmp_path):
    target = tmp_path / "a.txt"
    with atomic_file(target) as tmp:
        tmp.write_text("new")
        assert not target.exists() and tmp.parent.name.startswith(PARTIAL_PREFIX)
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]
    with pytest.raises(KeyboardInterrupt), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]


def test_atomic_dir_replaces_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as new:
        (new / "x").write_text("1")
        raise RuntimeError("failed half way")
    assert os.listdir(target) == ["stale.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    old = os.umask(0o022)
    try:
        with atomic_dir(target) as new:
            (new / "x").write_text("1")
    finally:
        os.umask(old)
    assert os.listdir(target) == ["x"] and sorted(os.listdir(tmp_path)) == ["out"]
    assert os.stat(target).st_mode & 0o777 == 0o755  # the umask's, not mkdtemp's 0700


def test_stale_partials(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{PARTIAL_PREFIX}{int(dead.stdout)}-x"
    stale.mkdir()
    live = tmp_path / f"{PARTIAL_PREFIX}{os.getppid()}-y"
    live.mkdir()
    with scratch_dir(tmp_path, "t") as scratch:
        assert scratch.name.startswith(f"{PARTIAL_PREFIX}{os.getpid()}-t-") and not stale.exists()
    assert not scratch.exists() and live.exists()
    assert remove_stale_partials(tmp_path) == []
