"""The tables of docs/evidence.md (scripts/evidence_tables.py) from known scores."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from RobustMedSAMLib.evaluation.report import Score

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "evidence_tables.py"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("evidence_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _score(model: str, case: str, value: float, seed: int = 0, corruption: str = "clean"):
    severity = 0 if corruption == "clean" else 3
    return Score(model, "set", "CT", case, "3D box/mask", corruption, severity, seed, value)


def test_same_cells_table_compares_only_the_cells_both_models_ran(tables):
    """LiteMedSAM also ran case B and seed 1 of the corruption; the row must leave them
    out, or the two models' means would cover different cases."""
    scores = [
        _score("litemedsam", "A", 0.8),
        _score("litemedsam", "A", 0.6, seed=1),
        _score("litemedsam", "B", 0.1),  # robustmedsam-lite never reached B
        _score("litemedsam", "A", 0.5, corruption="gaussian_noise"),
        _score("litemedsam", "A", 0.0, seed=1, corruption="gaussian_noise"),
        _score("robustmedsam-lite", "A", 0.9),
        _score("robustmedsam-lite", "A", 0.7, seed=1),
        _score("robustmedsam-lite", "A", 0.85, corruption="gaussian_noise"),
    ]
    lines = tables.same_cells_table(scores)
    assert lines[2:] == [
        "| 3D box/mask | 1 clean, 1 degraded "
        "| 0.700 ± 0.100 (2 seeds) | 0.500 (1 seed) | 0.200 "
        "| 0.800 ± 0.100 (2 seeds) | 0.850 (1 seed) | -0.050 |"
    ]


def test_same_cells_table_skips_a_setting_one_model_did_not_run(tables):
    scores = [_score("litemedsam", "A", 0.8), _score("demo", "A", 0.4)]
    assert tables.same_cells_table(scores)[2:] == []
