"""``robustmedsam evaluate`` end to end on a tiny random model and phantom data."""

from __future__ import annotations

import csv

import pytest

from RobustMedSAMLib.cli import main

RUN = [
    "--data", "phantom:sphere,size=24", "--corruptions", "clean", "gaussian_noise",
    "--severities", "1", "3", "--seeds", "0", "1", "--prompt", "box", "--projection", "mask",
    "--clicks", "2", "--device", "cpu", "--no-progress",
]  # fmt: skip
CELLS = (1 + 2 * 2) * 2  # conditions x (interactive + volumetric)


@pytest.fixture
def no_local_models(tmp_path, monkeypatch):
    """Registry lookups find nothing: an empty models folder and cache."""
    monkeypatch.setenv("ROBUSTMEDSAM_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def evaluate(out, *models, extra=()):
    args = ["evaluate", *[a for m in models for a in ("--model", m)], "--out", str(out)]
    return main([*args, *RUN, *extra])


def test_outputs_are_complete_and_deterministic(tmp_path, tiny_checkpoints, capsys):
    robust = str(tiny_checkpoints["robust"])
    for name in ("a", "b"):
        assert main(["evaluate", "--model", "robustsam", "--checkpoint", robust,
                     "--out", str(tmp_path / name), *RUN]) == 0  # fmt: skip
    first = (tmp_path / "a/results.csv").read_text()
    assert first == (tmp_path / "b/results.csv").read_text()
    rows = list(csv.DictReader(first.splitlines()))
    cells = {tuple(r[k] for k in ("protocol", "corruption", "severity", "seed")) for r in rows}
    assert len(cells) == CELLS and {r["status"] for r in rows} == {"ok"}
    assert {r["metric"] for r in rows} == {"dice", "iou", "slice_dice"}
    clicks = [r["index"] for r in rows if r["protocol"] == "interactive" and r["metric"] == "dice"]
    assert clicks == ["0", "1", "2"] * 5  # first prompt + 2 corrections, 5 conditions
    summary = (tmp_path / "a/summary.md").read_text()
    assert (
        "| robustsam | all | 2D box |" in summary and "| robustsam | all | 3D box/mask |" in summary
    )
    pngs = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert pngs == [
        "dice_by_corruption.png", "dice_vs_clicks.png", "dice_vs_severity_2d_box.png",
        "dice_vs_severity_3d_box_mask.png", "per_slice_dice.png",
    ]  # fmt: skip
    assert f"{CELLS} cells computed" in capsys.readouterr().out


def test_resume_skips_finished_cells_and_redoes_a_broken_one(tmp_path, tiny_checkpoints, capsys):
    robust = f"robustsam:{tiny_checkpoints['robust']}"
    assert evaluate(tmp_path, robust) == 0
    path = tmp_path / "results.csv"
    complete = path.read_text()
    capsys.readouterr()
    assert evaluate(tmp_path, robust) == 0
    assert f"0 cells computed, {CELLS} already done" in capsys.readouterr().out
    assert path.read_text() == complete
    lines = complete.splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # a crash in the middle of the last cell's write
    assert evaluate(tmp_path, robust) == 0
    assert f"1 cells computed, {CELLS - 1} already done" in capsys.readouterr().out
    assert sorted(path.read_text().splitlines()) == sorted(complete.splitlines())


def test_missing_model_is_reported(tmp_path, tiny_checkpoints, no_local_models, capsys):
    robust = f"robustsam:{tiny_checkpoints['robust']}"
    not_weights = tmp_path / "notes.pth"
    not_weights.write_text("not a checkpoint")
    models = ["medsam", "ft=fused:nowhere/best.pth", f"odd=robustsam:{not_weights}"]
    assert evaluate(tmp_path / "out", robust, *models) == 0
    err = capsys.readouterr().err
    for label in ("medsam", "ft", "odd"):  # an unusable file is not called missing
        assert f"model {label}: not loaded, no results (the summary says why)" in err
    assert "checkpoint missing" not in err
    tmp_path = tmp_path / "out"
    summary = (tmp_path / "summary.md").read_text()
    assert "| medsam | - | - | 0 | missing: model 'medsam' (medsam_vit_b.pth) is not" in summary
    assert "| ft | - | - | 0 | missing: checkpoint file not found: nowhere/best.pth" in summary
    assert "notes.pth: not a PyTorch checkpoint" in summary
    assert "| robustsam | all | 2D box |" in summary


def test_bad_options_exit_with_one_line(tmp_path, capsys):
    assert evaluate(tmp_path, "sam", extra=["--corruptions", "fog"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robustmedsam evaluate: error: unknown corruption ['fog']")
    assert "\n" not in err and not (tmp_path / "results.csv").exists()
    assert main(["evaluate", "--model", "sam", "--model", "medsam", "--checkpoint", "x.pth",
                 "--data", "phantom:all", "--out", str(tmp_path)]) == 2  # fmt: skip
    assert "--checkpoint goes with a single --model" in capsys.readouterr().err
