"""loadtest/warehouse_replay.py, briefly: the adapter and Warehouse's limiter over `limits`
differ only where a refused hit spans several windows."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support.common import ROOT


@pytest.mark.slow
def test_only_the_several_windows_case_differs() -> None:
    """A short replay of every case finds no unexplained difference, and finds the
    several-window one on the two-window limit."""
    done = subprocess.run([sys.executable, str(ROOT / "loadtest" / "warehouse_replay.py"),
                           "--ops", "150", "--seed", "3"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "unexplained differences: 0", done.stdout
    two = lines.index(next(line for line in lines if line.startswith('"1 per 1 second')))
    assert lines[two + 1].startswith("  several windows"), done.stdout
