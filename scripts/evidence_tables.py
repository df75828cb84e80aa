"""The Markdown tables of docs/evidence.md from an evaluation's ``results.csv``.

    .venv/bin/python scripts/evidence_tables.py runs/evidence/results.csv > tables.md

Reads the harness's rows through ``evaluation.report`` (headline Dice per cell: 2D after
the first prompt, 3D the whole volume; per seed the mean over cases, then mean ± standard
deviation over seeds) and prints: clean Dice on the real scans; clean against degraded
on the cases run degraded; degraded per corruption type; 3D per case; the phantoms; the
issue's targets against what was measured. Data set ``phantoms`` is the synthetic one;
every other data set is a real scan.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from RobustMedSAMLib.corruptions import CORRUPTIONS
from RobustMedSAMLib.evaluation.matrix import CLEAN
from RobustMedSAMLib.evaluation.report import (
    Score,
    Summary,
    condition_summary,
    degraded_summary,
    headline_scores,
    read_rows,
)

PHANTOMS = "phantoms"
SETTINGS = ("2D box", "2D point", "3D box/mask", "3D point/mask")
MODELS = ("litemedsam", "robustmedsam-lite", "demo")


def _models(scores: list[Score]) -> list[str]:
    present = {s.model for s in scores}
    return [m for m in MODELS if m in present] + sorted(present - set(MODELS))


def _text(summary: Summary, cases: bool = False) -> str:
    if summary.mean != summary.mean:
        return "-"
    text = f"{summary.mean:.3f}" + (f" ± {summary.std:.3f}" if summary.seeds > 1 else "")
    count = f"{summary.cases} cases, " if cases else ""
    return f"{text} ({count}{summary.seeds} seed{'s' if summary.seeds > 1 else ''})"


def _pick(scores: list[Score], **where) -> list[Score]:
    """The scores matching ``where``, keeping per condition only the seeds run on the
    most cases (a seed run on fewer cases would average other cases)."""
    picked = [s for s in scores if all(getattr(s, k) == v for k, v in where.items())]
    cases: dict[tuple, set[str]] = defaultdict(set)
    for s in picked:
        cases[(s.corruption, s.severity, s.seed)].add(s.case)
    most: dict[tuple, int] = defaultdict(int)
    for (corruption, severity, _), names in cases.items():
        most[(corruption, severity)] = max(most[(corruption, severity)], len(names))
    return [s for s in picked if len(cases[(s.corruption, s.severity, s.seed)]) == most[
        (s.corruption, s.severity)]]  # fmt: skip


def _degraded_cases(scores: list[Score]) -> list[Score]:
    cases = {s.case for s in scores if s.corruption != CLEAN}
    return [s for s in scores if s.case in cases]


def clean_table(scores: list[Score]) -> list[str]:
    lines = ["| model | " + " | ".join(SETTINGS) + " |", "|---|" + "---|" * len(SETTINGS)]
    for model in _models(scores):
        cells = [
            _text(condition_summary(_pick(scores, model=model, setting=s), CLEAN, 0), True)
            for s in SETTINGS
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def degraded_table(scores: list[Score]) -> list[str]:
    lines = [
        "| model | setting | cases | clean | degraded (12 types, severity 3) | drop |",
        "|---|---|---|---|---|---|",
    ]
    for setting in SETTINGS:
        for model in _models(scores):
            mine = _degraded_cases(_pick(scores, model=model, setting=setting))
            degraded = degraded_summary(mine)
            if degraded.cases == 0:
                continue
            clean = condition_summary(mine, CLEAN, 0)
            drop = clean.mean - degraded.mean
            lines.append(
                f"| {model} | {setting} | {degraded.cases} | {_text(clean)} | "
                f"{_text(degraded)} | {drop:.3f} |"
            )
    return lines


def corruption_table(scores: list[Score], setting: str) -> list[str]:
    names = [c for c in CORRUPTIONS if any(s.corruption == c for s in scores)]
    if not names:
        return []
    lines = ["| model | clean | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for model in _models(scores):
        mine = _degraded_cases(_pick(scores, model=model, setting=setting))
        if not any(s.corruption != CLEAN for s in mine):
            continue
        cells = [_text(condition_summary(mine, CLEAN, 0))]
        cells += [_text(degraded_summary(mine, name)) for name in names]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def case_table(scores: list[Score]) -> list[str]:
    models = _models(scores)
    head = [f"{m} {p}" for m in models for p in ("box", "point")]
    lines = ["| case | data set | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for case in sorted({s.case for s in scores}, key=lambda c: (_dataset(scores, c), c)):
        cells = []
        for model in models:
            for setting in ("3D box/mask", "3D point/mask"):
                mine = _pick(scores, model=model, case=case, setting=setting, corruption=CLEAN)
                cells.append(f"{np.mean([s.value for s in mine]):.2f}" if mine else "-")
        lines.append(f"| {case} | {_dataset(scores, case)} | " + " | ".join(cells) + " |")
    return lines


def _dataset(scores: list[Score], case: str) -> str:
    return next(s.dataset for s in scores if s.case == case)


def _cell(s: Score) -> tuple:
    return (s.case, s.corruption, s.severity, s.seed)


def _common(scores: list[Score], models: tuple[str, ...]) -> list[Score]:
    """The scores of ``models`` on the cells (case, condition, seed) every one of them ran."""
    cells: dict[str, set[tuple]] = defaultdict(set)
    for s in scores:
        cells[s.model].add(_cell(s))
    shared = set.intersection(*(cells[m] for m in models))
    return [s for s in scores if s.model in models and _cell(s) in shared]


def same_cells_table(scores: list[Score], models: tuple[str, ...] = MODELS[:2]) -> list[str]:
    """``models`` side by side per setting, each on the cells all of them ran: clean
    Dice, and degraded Dice and the drop on the cases run degraded."""
    head = [f"{m} {part}" for m in models for part in ("clean", "degraded", "drop")]
    lines = ["| setting | cases | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for setting in SETTINGS:
        common = _common([s for s in scores if s.setting == setting], models)
        if not common:
            continue
        cells = []
        for model in models:
            own = [s for s in common if s.model == model]
            clean, worse = condition_summary(own, CLEAN, 0), _degraded_cases(own)
            degraded = degraded_summary(worse)
            pair = (condition_summary(worse, CLEAN, 0).mean, degraded.mean)
            cells += [_text(clean), _text(degraded), _drop(pair)]
        cases = f"{clean.cases} clean" + (f", {degraded.cases} degraded" if degraded.cases else "")
        lines.append(f"| {setting} | {cases} | " + " | ".join(cells) + " |")
    return lines


def targets_table(scores: list[Score]) -> list[str]:
    def clean(model: str, setting: str) -> float:
        return condition_summary(_pick(scores, model=model, setting=setting), CLEAN, 0).mean

    def pair(model: str, setting: str) -> tuple[float, float]:
        mine = _degraded_cases(_pick(scores, model=model, setting=setting))
        return condition_summary(mine, CLEAN, 0).mean, degraded_summary(mine).mean

    rows: list[tuple[str, str, Callable[[str], str]]] = [
        ("3D from one box, mean Dice", ">= 0.85", lambda m: _mean(clean(m, "3D box/mask"))),
        ("3D from one point, mean Dice", ">= 0.70", lambda m: _mean(clean(m, "3D point/mask"))),
    ]
    for setting in SETTINGS:
        rows.append(
            (f"{setting}: clean - degraded", "<= 0.03", lambda m, s=setting: _drop(pair(m, s)))
        )
    models = _models(scores)
    lines = ["| target | wanted | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for name, wanted, value in rows:
        lines.append(f"| {name} | {wanted} | " + " | ".join(value(m) for m in models) + " |")
    return lines


def _mean(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"


def _drop(pair: tuple[float, float]) -> str:
    clean, degraded = pair
    return "-" if degraded != degraded else f"{clean - degraded:.3f}"


def main(path: str) -> None:
    scores = headline_scores(read_rows(path))
    real = [s for s in scores if s.dataset != PHANTOMS]
    phantoms = [s for s in scores if s.dataset == PHANTOMS]
    sections = [
        ("Real scans, clean (mean ± sd over seeds; cases)", clean_table(real)),
        ("Real scans, clean against degraded on the same cases", degraded_table(real)),
        ("Real scans, 2D box, per corruption type", corruption_table(real, "2D box")),
        ("Real scans, 2D point, per corruption type", corruption_table(real, "2D point")),
        ("Real scans, 3D box, per corruption type", corruption_table(real, "3D box/mask")),
        ("Real scans, 3D point, per corruption type", corruption_table(real, "3D point/mask")),
        ("Real scans, 3D clean, per case (mean over seeds)", case_table(real)),
        ("Phantoms, clean (cases)", clean_table(phantoms)),
        ("Phantoms, clean against degraded", degraded_table(phantoms)),
        ("Targets (real scans)", targets_table(real)),
        ("Real scans, the two lite models on the same cells", same_cells_table(real)),
    ]
    for title, lines in sections:
        if len(lines) > 2:
            print(f"### {title}\n")
            print("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
