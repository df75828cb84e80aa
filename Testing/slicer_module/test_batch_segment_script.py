"""scripts/batch_segment.py always hands an exit status to Slicer (review finding 9)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "batch_segment.py"


@pytest.fixture
def script():
    spec = importlib.util.spec_from_file_location("batch_segment_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exit_status(script, main) -> list[int]:
    codes: list[int] = []
    script.main = main
    script.run(["volume.nrrd", "--out", "out.seg.nrrd"], codes.append)
    return codes


def test_an_unexpected_error_still_exits_with_status_1(script, capsys):
    def broken(argv):
        raise ModuleNotFoundError("No module named 'torch'")

    assert exit_status(script, broken) == [1]
    assert "No module named 'torch'" in capsys.readouterr().err


def test_bad_arguments_exit_2_and_success_exits_0(script):
    assert exit_status(script, lambda argv: script.parse(["--nope"])) == [2]
    assert exit_status(script, lambda argv: 0) == [0]
    assert exit_status(script, lambda argv: 2) == [2]


def test_the_model_is_the_projects_default_unless_named(script):
    """As the command line, the panel and the Python API (it was LiteMedSAM here)."""
    from RobustMedSAMLib.names import DEFAULT_MODEL

    assert script.parse(["volume.nrrd", "--out", "out.seg.nrrd"]).model == DEFAULT_MODEL
    named = script.parse(["v.nrrd", "--out", "o.seg.nrrd", "--model", "litemedsam"])
    assert named.model == "litemedsam"
