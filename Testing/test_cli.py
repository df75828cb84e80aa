"""The ``robustmedsam`` entry point itself: what every command shares."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["corruptions"], ["models", "--json"]])
def test_a_reader_that_stops_early_gets_no_traceback(command):
    # `robustmedsam models --json | head -1`: the pipe closes before the output is written
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "RobustMedSAMLib", *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    process.stdout.close()
    error = process.stderr.read().decode()
    assert process.wait(timeout=120) == 1
    assert "Traceback" not in error and "BrokenPipeError" not in error, error
