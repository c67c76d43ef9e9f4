"""scripts/kernels_gpu_suite.sh's own handling (its phases need a GPU): usage, an unknown phase, the exit status."""

import subprocess
from pathlib import Path

SUITE = Path(__file__).parent.parent / "scripts" / "kernels_gpu_suite.sh"


def _run(*args):
    return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True, timeout=60)


def test_usage_without_phases(tmp_path):
    done = _run(str(tmp_path / "out"))
    assert done.returncode == 2 and "usage: bash scripts/kernels_gpu_suite.sh OUT PHASE" in done.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_phase_fails_and_the_others_still_run(tmp_path):
    done = _run(str(tmp_path / "out"), "bogus", "e2e")
    assert done.returncode != 0
    assert "unknown phase bogus" in done.stderr and "e2e: set BUILDER" in done.stderr
    assert "== bogus: exit 1" in done.stdout and "== e2e: exit 1" in done.stdout
