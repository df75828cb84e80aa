"""Turn ``results.csv`` into ``summary.md`` and PNG plots.

Headline value of a cell: interactive, the Dice after the first prompt (``click 0``)
and after the last correction; volumetric, the Dice of the 3D mask. For each model,
data group (a data set, a modality, or all) and setting (protocol + prompt +
projection): the mean over cases per seed, then mean and standard deviation over
seeds. *Degraded* is the paper's figure: per seed, the mean over every corruption
type and severity; then mean and standard deviation over seeds. A deterministic
corruption type (run with the first seed only) counts the same for every seed.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from RobustMedSAMLib.corruptions import CORRUPTIONS
from RobustMedSAMLib.evaluation.matrix import CLEAN
from RobustMedSAMLib.evaluation.metrics import mean_std
from RobustMedSAMLib.evaluation.plot import Panel, draw_panels
from RobustMedSAMLib.evaluation.results_csv import CSV_NAME, KEY
from RobustMedSAMLib.formats.atomic import atomic_output

ALL = "all"


@dataclass(frozen=True)
class Score:
    """One cell's headline Dice, with where it came from."""

    model: str
    dataset: str
    modality: str
    case: str
    setting: str
    corruption: str
    severity: int
    seed: int
    value: float


def read_rows(path: str | Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def setting_of(row: dict) -> str:
    """``2D point``, ``2D box``, ``3D box/mask`` ..."""
    if row["protocol"] == "interactive":
        return f"2D {row['prompt']}"
    return f"3D {row['prompt']}/{row['projection']}"


def headline_scores(rows: Iterable[dict], final_click: bool = False) -> list[Score]:
    """The headline Dice of every ok cell (see the module docstring)."""
    last: dict[tuple, int] = {}
    picked: dict[tuple, dict] = {}
    for row in rows:
        if row["status"] != "ok" or row["metric"] != "dice":
            continue
        key = tuple(row[k] for k in KEY)
        index = int(row["index"]) if row["index"] != "" else 0
        take = index == 0 if not final_click else index >= last.get(key, -1)
        if take:
            last[key], picked[key] = index, row
    return [
        Score(r["model"], r["dataset"], r["modality"], r["case"], setting_of(r), r["corruption"],
              int(r["severity"]), int(r["seed"]), float(r["value"]))
        for r in picked.values()
    ]  # fmt: skip


@dataclass
class Summary:
    """Mean and standard deviation over seeds, and the number of seeds and cases."""

    mean: float
    std: float
    seeds: int
    cases: int

    def text(self) -> str:
        if self.mean != self.mean:
            return "-"
        return f"{self.mean:.3f} ± {self.std:.3f}"


def _per_seed(scores: list[Score]) -> dict[tuple[str, int], dict[int, float]]:
    """(corruption, severity) -> seed -> mean over cases."""
    buckets: dict[tuple, list[float]] = defaultdict(list)
    for s in scores:
        buckets[(s.corruption, s.severity, s.seed)].append(s.value)
    out: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    for (corruption, severity, seed), values in buckets.items():
        out[(corruption, severity)][seed] = float(np.mean(values))
    return out


def condition_summary(scores: list[Score], corruption: str, severity: int) -> Summary:
    by_seed = _per_seed(scores).get((corruption, severity), {})
    mean, std = mean_std(list(by_seed.values()))
    cases = len({s.case for s in scores if (s.corruption, s.severity) == (corruption, severity)})
    return Summary(mean, std, len(by_seed), cases)


def degraded_summary(scores: list[Score], corruption: str | None = None) -> Summary:
    """Per seed, the mean over corruption types and severities (of one type when
    ``corruption`` is given); then mean and std over seeds."""
    table = {
        k: v for k, v in _per_seed(scores).items() if k[0] != CLEAN and corruption in (None, k[0])
    }
    if not table:
        return Summary(float("nan"), float("nan"), 0, 0)
    seeds = sorted({seed for per_seed in table.values() for seed in per_seed})
    totals = []
    for seed in seeds:
        values = [per_seed.get(seed, next(iter(per_seed.values()))) for per_seed in table.values()]
        totals.append(float(np.mean(values)))
    mean, std = mean_std(totals)
    cases = len({s.case for s in scores if s.corruption != CLEAN})
    return Summary(mean, std, len(seeds), cases)


def _clean_on_degraded_cases(scores: list[Score]) -> Summary:
    """Clean Dice over the cases that were also run degraded (all, when none was): the
    drop compares the same cases, also when the corruptions ran on a subset."""
    degraded = {s.case for s in scores if s.corruption != CLEAN}
    same = [s for s in scores if s.case in degraded] if degraded else scores
    return condition_summary(same, CLEAN, 0)


def _group(scores: list[Score], by: str) -> dict[tuple[str, str, str], list[Score]]:
    """(model, group, setting) -> scores; group = dataset, modality, or ``all``."""
    out: dict[tuple[str, str, str], list[Score]] = defaultdict(list)
    for s in scores:
        group = ALL if by == ALL else getattr(s, by)
        out[(s.model, group, s.setting)].append(s)
    return out


def missing_models(rows: Iterable[dict]) -> dict[str, str]:
    """Model label -> status text, for models with no ok row and a missing/error row."""
    ok = {r["model"] for r in rows if r["status"] == "ok"}
    return {
        r["model"]: r["status"]
        for r in rows
        if r["status"].startswith("missing") and r["model"] not in ok
    }


def _headline_table(scores: list[Score], missing: dict[str, str], by: str) -> list[str]:
    lines = [
        f"| model | {by} | setting | cases | clean Dice | degraded Dice | drop | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, group, setting), group_scores in sorted(_group(scores, by).items()):
        clean = condition_summary(group_scores, CLEAN, 0)
        degraded = degraded_summary(group_scores)
        drop = _clean_on_degraded_cases(group_scores).mean - degraded.mean
        drop_text = "-" if drop != drop else f"{drop:.3f}"
        cases = len({s.case for s in group_scores})
        degraded_text = degraded.text()
        if 0 < degraded.cases < cases:
            degraded_text += f" ({degraded.cases} cases)"
        lines.append(
            f"| {model} | {group} | {setting} | {cases} | {clean.text()} | {degraded_text} "
            f"| {drop_text} | {degraded.seeds or clean.seeds} |"
        )
    for model, status in sorted(missing.items()):
        lines.append(f"| {model} | - | - | 0 | {_cell_text(status)} | - | - | - |")
    return lines


def _cell_text(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def _corruption_table(scores: list[Score]) -> list[str]:
    corruptions = sorted({s.corruption for s in scores if s.corruption != CLEAN})
    if not corruptions:
        return []
    lines = [
        "| model | setting | " + " | ".join(corruptions) + " |",
        "|---|---|" + "---|" * len(corruptions),
    ]
    for (model, _, setting), group in sorted(_group(scores, ALL).items()):
        cells = [degraded_summary(group, c).text() for c in corruptions]
        lines.append(f"| {model} | {setting} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(rows: list[dict]) -> str:
    """The Markdown summary of a results CSV's rows."""
    scores, final = headline_scores(rows), headline_scores(rows, final_click=True)
    missing = missing_models(rows)
    errors = sum(1 for r in rows if r["status"].startswith("error"))
    out = ["# Evaluation summary", ""]
    out += ["Dice, mean ± standard deviation over seeds (each seed: mean over cases).",
            "Degraded: averaged over every corruption type and severity run; when fewer "
            "cases ran degraded than clean, their number is given and the drop is against "
            "the clean Dice of those cases. 2D rows: after the first prompt.", ""]  # fmt: skip
    out += ["## All data", "", *_headline_table(scores, missing, ALL), ""]
    out += ["## Per data set", "", *_headline_table(scores, {}, "dataset"), ""]
    out += ["## Per modality", "", *_headline_table(scores, {}, "modality"), ""]
    out += ["## Per case", "", *_headline_table(scores, {}, "case"), ""]
    interactive = [s for s in final if s.setting.startswith("2D")]
    if interactive:
        out += ["## 2D after the last correction click", ""]
        out += [*_headline_table(interactive, {}, ALL), ""]
    table = _corruption_table(scores)
    if table:
        out += ["## Degraded Dice per corruption type (all data, mean over severities)", ""]
        out += [*table, ""]
    if errors:
        out += [f"{errors} cell(s) failed; see the `status` column of {CSV_NAME}.", ""]
    return "\n".join(out)


# --- plots ------------------------------------------------------------------------------


def severity_panels(scores: list[Score], setting: str) -> list[Panel]:
    """One panel per corruption type: Dice vs severity (0 = clean), a line per model."""
    picked = [s for s in scores if s.setting == setting]
    corruptions = sorted({s.corruption for s in picked if s.corruption != CLEAN})
    models = sorted({s.model for s in picked})
    panels = []
    for corruption in corruptions:
        panel = Panel(corruption, xlabel="severity (0 = clean)")
        for model in models:
            mine = [s for s in picked if s.model == model]
            severities = sorted({s.severity for s in mine if s.corruption == corruption})
            xs = [0, *severities]
            ys = [condition_summary(mine, CLEAN, 0).mean] + [
                condition_summary(mine, corruption, sev).mean for sev in severities
            ]
            panel.series[model] = (xs, ys)
        panels.append(panel)
    return panels


def corruption_panels(scores: list[Score]) -> list[Panel]:
    """One panel per setting: Dice at x = 0 (clean) and 1..12 (the corruption types in
    ``CORRUPTIONS`` order, mean over the severities run), a line per model. Clean is
    taken over the cases run degraded, so that each line compares the same cases."""
    panels = []
    for setting in sorted({s.setting for s in scores}):
        picked = [s for s in scores if s.setting == setting]
        if all(s.corruption == CLEAN for s in picked):
            continue
        panel = Panel(setting, xlabel="0 clean, 1-12 corruption types")
        for model in sorted({s.model for s in picked}):
            mine = [s for s in picked if s.model == model]
            ys = [_clean_on_degraded_cases(mine).mean]
            ys += [degraded_summary(mine, name).mean for name in CORRUPTIONS]
            panel.series[model] = (list(range(len(ys))), ys)
        panels.append(panel)
    return panels


def click_panels(rows: list[dict]) -> list[Panel]:
    """Dice vs number of correction clicks (clean images), a panel per first prompt."""
    curves: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r["protocol"] == "interactive" and r["metric"] == "dice":
            if r["corruption"] == CLEAN:
                curves[(r["prompt"], r["model"], int(r["index"]))].append(float(r["value"]))
    panels = []
    for prompt in sorted({k[0] for k in curves}):
        panel = Panel(f"first prompt: {prompt} (clean)", xlabel="correction clicks")
        for model in sorted({k[1] for k in curves if k[0] == prompt}):
            steps = sorted(k[2] for k in curves if k[:2] == (prompt, model))
            panel.series[model] = (steps, [np.mean(curves[(prompt, model, i)]) for i in steps])
        panels.append(panel)
    return panels


def slice_panels(rows: list[dict]) -> list[Panel]:
    """Per-slice Dice vs offset from the prompted slice (clean), a panel per setting."""
    curves: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r["metric"] == "slice_dice" and r["corruption"] == CLEAN:
            curves[(setting_of(r), r["model"], int(r["index"]))].append(float(r["value"]))
    panels = []
    for setting in sorted({k[0] for k in curves}):
        panel = Panel(f"{setting} (clean)", xlabel="slice offset from prompted slice")
        for model in sorted({k[1] for k in curves if k[0] == setting}):
            offsets = sorted(k[2] for k in curves if k[:2] == (setting, model))
            panel.series[model] = (offsets, [np.mean(curves[(setting, model, o)]) for o in offsets])
        panels.append(panel)
    return panels


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


@dataclass
class ReportFiles:
    """What ``write_report`` wrote."""

    summary: Path
    plots: list[Path]


def write_report(out_dir: str | Path) -> ReportFiles:
    """Write ``summary.md`` and the PNG plots for ``out_dir/results.csv``."""
    out_dir = Path(out_dir)
    rows = read_rows(out_dir / CSV_NAME)
    summary = out_dir / "summary.md"
    with atomic_output(summary) as temporary:
        temporary.write_text(summary_markdown(rows), encoding="utf-8")
    plots = []
    scores = headline_scores(rows)
    for setting in sorted({s.setting for s in scores}):
        panels = severity_panels(scores, setting)
        if panels:
            name = out_dir / f"dice_vs_severity_{_slug(setting)}.png"
            title = f"Dice vs severity, {setting}"
            plots.append(draw_panels(panels, name, title, columns=4))
    if panels := corruption_panels(scores):
        name = out_dir / "dice_by_corruption.png"
        title = "Dice by corruption: 0 clean, 1-12 in `robustmedsam corruptions` order"
        plots.append(draw_panels(panels, name, title, 2))
    if panels := click_panels(rows):
        name = out_dir / "dice_vs_clicks.png"
        plots.append(draw_panels(panels, name, "Dice vs number of clicks", 2))
    if panels := slice_panels(rows):
        name = out_dir / "per_slice_dice.png"
        plots.append(draw_panels(panels, name, "3D per-slice Dice", 3))
    return ReportFiles(summary, plots)
