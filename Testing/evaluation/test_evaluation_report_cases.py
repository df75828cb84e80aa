"""The summary and the per-corruption plot compare clean and degraded Dice on the same
cases when the corruptions ran on a subset of them."""

from __future__ import annotations

from RobustMedSAMLib.corruptions import CORRUPTIONS
from RobustMedSAMLib.evaluation.report import (
    corruption_panels,
    headline_scores,
    summary_markdown,
    write_report,
)
from RobustMedSAMLib.evaluation.results_csv import COLUMNS, CSV_NAME


def _row(case: str, corruption: str, seed: int, value: float) -> dict:
    row = dict.fromkeys(COLUMNS, "")
    severity = "0" if corruption == "clean" else "3"
    row.update(model="m", dataset="d", modality="CT", case=case, protocol="interactive",
               prompt="box", corruption=corruption, severity=severity, seed=str(seed),
               metric="dice", index="0", value=str(value), status="ok")  # fmt: skip
    return row


def _rows() -> list[dict]:
    """Case a: clean 0.9, degraded 0.8 (seeds 0, 1); case b: clean only, 0.5."""
    rows = [_row("a", "clean", seed, 0.9) for seed in (0, 1)]
    rows += [_row("b", "clean", seed, 0.5) for seed in (0, 1)]
    rows += [_row("a", "gaussian_noise", seed, 0.8) for seed in (0, 1)]
    return rows


def test_drop_is_against_the_clean_dice_of_the_cases_run_degraded():
    summary = summary_markdown(_rows())
    line = next(x for x in summary.splitlines() if x.startswith("| m | all | 2D box |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:7] == ["2", "0.700 ± 0.000", "0.800 ± 0.000 (1 cases)", "0.100"]


def test_corruption_panel_starts_from_the_same_cases_clean(tmp_path):
    (panel,) = corruption_panels(headline_scores(_rows()))
    xs, ys = panel.series["m"]
    assert list(xs) == list(range(13)) and ys[0] == 0.9
    assert ys[1 + list(CORRUPTIONS).index("gaussian_noise")] == 0.8
    rows = _rows()
    with open(tmp_path / CSV_NAME, "w") as handle:
        handle.write(",".join(COLUMNS) + "\n")
        handle.writelines(",".join(r[c] for c in COLUMNS) + "\n" for r in rows)
    files = write_report(tmp_path)
    assert tmp_path / "dice_by_corruption.png" in files.plots
