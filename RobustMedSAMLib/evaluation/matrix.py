"""The evaluation matrix: models x cases x conditions (clean, corruption x severity x
seed) x protocol variants, one *cell* each, appended to a CSV as it finishes.

Resumable: a cell's rows are appended in one write, each row carrying the cell's row
count; on a new run, complete ``ok`` cells are kept and skipped, anything else
(an interrupted cell, a missing model, an error) is dropped and tried again.
Several processes (``evaluation.parallel``) each append to their own part file
``parts/NAME.csv`` instead; ``evaluation.shards.merge_parts`` folds them into the CSV.

CSV columns (``results_csv.COLUMNS``), one row per number: ``metric`` is dice or iou (index:
click step for interactive, empty for the 3D volume) or slice_dice (index: slice
offset from the prompted slice). A model whose checkpoint is missing gets one row
with status ``missing: <what to do>``; a failed cell one row ``error: <message>``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from RobustMedSAMLib.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from RobustMedSAMLib.errors import (
    CancelledError,
    CheckpointError,
    InputError,
    RobustMedSAMError,
)
from RobustMedSAMLib.evaluation import shards
from RobustMedSAMLib.evaluation.datasets import Case
from RobustMedSAMLib.evaluation.interactive import (
    FIRST_PROMPTS,
    SlicePredictor,
    evaluate_interactive,
)
from RobustMedSAMLib.evaluation.models import ModelEntry
from RobustMedSAMLib.evaluation.results_csv import CSV_NAME, KEY, append_cell, finished_cells
from RobustMedSAMLib.evaluation.timing import CallTimes, TimedPredictor
from RobustMedSAMLib.evaluation.volumetric import central_slice, evaluate_volume
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.propagation import PROJECTIONS, PropagationOptions
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.names import PROTOCOLS
from RobustMedSAMLib.progress import Cancel, Progress, cancel_check

log = logging.getLogger(__name__)

CLEAN = "clean"


@dataclass
class MatrixOptions:
    """What to run. corruptions: names from ``CORRUPTIONS`` and/or ``"clean"``;
    deterministic corruption types run with the first seed only (others: every seed).
    projections: propagation modes for the volumetric protocol (default: all).
    prompt_jitter: 0 gives the exact first prompt; above 0 the seed also draws a
    jittered one (``interactive.first_prompt``), and clean and deterministic types then
    run with every seed too."""

    protocols: Sequence[str] = PROTOCOLS
    prompts: Sequence[str] = FIRST_PROMPTS
    projections: Sequence[str] = PROJECTIONS
    n_corrections: int = 7
    corruptions: Sequence[str] = (CLEAN, *CORRUPTIONS)
    severities: Sequence[int] = SEVERITIES
    seeds: Sequence[int] = (0, 1, 2)
    axis: int = 0
    prompt_jitter: float = 0.0

    def validate(self) -> None:
        """InputError naming the first unusable option."""
        _check_subset("protocol", self.protocols, PROTOCOLS)
        _check_subset("prompt", self.prompts, FIRST_PROMPTS)
        _check_subset("projection", self.projections, PROJECTIONS)
        _check_subset("corruption", self.corruptions, (CLEAN, *CORRUPTIONS))
        _check_subset("severity", self.severities, SEVERITIES)
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise InputError("give at least one seed, each >= 0")
        if self.n_corrections < 0:
            raise InputError("the number of correction clicks must be >= 0")
        if not 0 <= self.prompt_jitter <= 1:
            raise InputError(f"prompt jitter {self.prompt_jitter} must be within 0..1")


def _check_subset(what: str, values: Sequence, allowed: Sequence) -> None:
    if not values:
        raise InputError(f"give at least one {what}")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise InputError(f"unknown {what} {unknown}: choose from {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class Condition:
    """An image condition: clean (severity 0, seed 0) or one corruption setting."""

    corruption: str
    severity: int
    seed: int


@dataclass(frozen=True)
class Variant:
    """A protocol variant: interactive + prompt, or volumetric + prompt + projection."""

    protocol: str
    prompt: str
    projection: str = ""


def conditions(options: MatrixOptions) -> list[Condition]:
    """The image conditions in run order."""
    jittered = options.prompt_jitter > 0
    clean_seeds = options.seeds if jittered else (0,)
    out = [Condition(CLEAN, 0, s) for s in clean_seeds] if CLEAN in options.corruptions else []
    for name in (c for c in CORRUPTIONS if c in options.corruptions):
        random = CORRUPTIONS[name].random or jittered
        seeds = options.seeds if random else options.seeds[:1]
        out += [Condition(name, s, seed) for s in options.severities for seed in seeds]
    return out


def variants(options: MatrixOptions, case: Case) -> list[Variant]:
    """Protocol variants for a case (volumetric ones for 3D cases only)."""
    out = []
    if "interactive" in options.protocols:
        out += [Variant("interactive", p) for p in options.prompts]
    if "volumetric" in options.protocols and case.is_3d:
        out += [Variant("volumetric", p, j) for p in options.prompts for j in options.projections]
    return out


def cell_key(model: str, case: Case, variant: Variant, condition: Condition) -> tuple:
    """The CSV key of a cell (strings, as read back from the file)."""
    return (model, case.dataset, case.modality, case.case, variant.protocol, variant.prompt,
            variant.projection, condition.corruption, str(condition.severity),
            str(condition.seed))  # fmt: skip


def _number(value: float) -> str:
    return f"{value:.6f}"


# --- running ----------------------------------------------------------------------------


@dataclass
class MatrixResult:
    """Counts of one run: cells computed, skipped (already in the CSV), failed, and
    the labels of models whose checkpoint was missing; times: encoder / decoder calls
    and seconds per model run here."""

    computed: int = 0
    skipped: int = 0
    failed: int = 0
    missing: list[str] = field(default_factory=list)
    csv_path: Path | None = None
    times: dict[str, CallTimes] = field(default_factory=dict)


def run_matrix(
    models: Sequence[ModelEntry],
    cases: Sequence[Case],
    out_dir: str | Path,
    options: MatrixOptions | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    part: str | None = None,
) -> MatrixResult:
    """Evaluate every model on every case and condition; append to ``out_dir/results.csv``
    (or, with ``part``, to ``out_dir/parts/PART.csv``: one writer per part file).

    Cells already finished in that CSV (or in any part file) are skipped.
    ``progress(done, total)`` counts cells; ``cancel`` (a callable returning True, or a
    threading.Event) is checked between cells: CancelledError, the finished cells stay.
    """
    cancel = cancel_check(cancel)
    options = options or MatrixOptions()
    options.validate()
    if not cases:
        raise InputError("no cases to evaluate: check the data specs")
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise InputError(f"model labels must be unique, got {labels}: use LABEL=NAME:FILE")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if part is None:
        shards.merge_parts(out_dir)  # parts an interrupted parallel run left
        path = out_dir / CSV_NAME
        done = finished_cells(path)
    else:
        path = shards.part_path(out_dir, part)
        done = finished_cells(path) | shards.finished_elsewhere(out_dir, path)
    plan = [(c, conditions(options), variants(options, c)) for c in cases]
    per_model = sum(len(conds) * len(vars_) for _, conds, vars_ in plan)
    total, result = per_model * len(models), MatrixResult(csv_path=path)
    count = 0
    for model in models:
        todo = [
            (case, cond, var)
            for case, conds, vars_ in plan
            for cond in conds
            for var in vars_
            if cell_key(model.label, case, var, cond) not in done
        ]
        result.skipped += per_model - len(todo)
        count += per_model - len(todo)
        if progress is not None:
            progress(count, total)
        if not todo:
            continue
        try:
            predictor = TimedPredictor(model.load())
        except CheckpointError as error:
            log.warning("model %s: %s", model.label, error)
            append_cell(path, [_status_row(model.label, f"missing: {error}")])
            result.missing.append(model.label)
            count += len(todo)
            continue
        result.times[model.label] = predictor.times
        for computed in _run_model(model.label, predictor, todo, options, path, cancel):
            result.computed += computed
            result.failed += 1 - computed
            count += 1
            if progress is not None:
                progress(count, total)
    return result


def _status_row(model: str, status: str, key: tuple | None = None) -> dict:
    row = dict(zip(KEY, key, strict=True)) if key else {k: "" for k in KEY}
    row["model"] = model
    return {**row, "metric": "", "index": "", "value": "", "status": status}


def _run_model(
    label: str,
    predictor: SlicePredictor,
    todo: list[tuple[Case, Condition, Variant]],
    options: MatrixOptions,
    path: Path,
    cancel: Callable[[], bool],
) -> Iterator[int]:
    """Run the cells of one model, grouped by (case, condition) so that a corrupted
    image and its slice embeddings are made once per group. Yields 1 per finished
    cell, 0 per failed one."""
    group: tuple | None = None
    context: _GroupContext | None = None
    for case, condition, variant in todo:
        if cancel():
            raise CancelledError("evaluation cancelled; finished cells are in the CSV")
        if group != (id(case), condition):
            group, context = (id(case), condition), _GroupContext(case, condition, predictor)
        key = cell_key(label, case, variant, condition)
        try:
            rows = _evaluate_cell(context, variant, options)
        except (CancelledError, KeyboardInterrupt):
            raise
        except RobustMedSAMError as error:
            log.warning("cell %s failed: %s", key, error)
            append_cell(path, [_status_row(label, f"error: {error}", key)])
            yield 0
            continue
        head = dict(zip(KEY, key, strict=True))
        append_cell(path, [{**head, **row, "status": "ok"} for row in rows])
        yield 1


class _GroupContext:
    """The corrupted image of one case and condition, made on first use, and a
    session that keeps its slice embeddings across the protocol variants."""

    def __init__(self, case: Case, condition: Condition, predictor: SlicePredictor) -> None:
        self.case, self.condition, self.predictor = case, condition, predictor
        self._image: np.ndarray | None = None
        self._session: SegmentationSession | None = None
        self._slice: tuple | None = None

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            c = self.condition
            if c.corruption == CLEAN:
                self._image = self.case.image
            else:
                self._image = corrupt(
                    self.case.image, c.corruption, c.severity, c.seed, self.case.spacing
                )
        return self._image

    def session(self, axis: int) -> SegmentationSession:
        if self._session is None:
            volume = Volume(self.image, self.case.ijk_to_ras, self.case.case)
            window = self.case.window
            self._session = SegmentationSession(volume, self.predictor, axis, window=window)
        return self._session

    def slice_2d(self, axis: int) -> tuple[np.ndarray, np.ndarray, tuple | None, object]:
        """The 2D protocol's ``(image, truth, window, encoded)``: the whole image of a 2D
        case, the central slice of a 3D one (shown with the volume's window)."""
        if self._slice is None:
            image, truth, window = self.image, self.case.mask, self.case.window
            if self.case.is_3d:
                index = central_slice(truth, axis)
                session = self.session(axis)
                image, truth = session.slice_image(index), np.take(truth, index, axis=axis)
                window, encoded = session.window, session.encoded(index)
            else:
                encoded = self.predictor.encode(image, window)
            self._slice = (image, truth, window, encoded)
        return self._slice


def _evaluate_cell(context: _GroupContext, variant: Variant, options: MatrixOptions) -> list[dict]:
    case = context.case
    if variant.protocol == "interactive":
        image, truth, window, encoded = context.slice_2d(options.axis)
        result = evaluate_interactive(
            context.predictor, image, truth, variant.prompt, options.n_corrections, window,
            encoded, options.prompt_jitter, context.condition.seed,
        )  # fmt: skip
        return [
            {"metric": metric, "index": step, "value": _number(value)}
            for metric, values in (("dice", result.dice), ("iou", result.iou))
            for step, value in enumerate(values)
        ]
    session = context.session(options.axis)
    propagation = PropagationOptions(projection=variant.projection)
    result = evaluate_volume(
        context.predictor, session.volume, case.mask, variant.prompt, propagation,
        options.axis, session=session, jitter=options.prompt_jitter, seed=context.condition.seed,
    )  # fmt: skip
    rows = [
        {"metric": "dice", "index": "", "value": _number(result.dice)},
        {"metric": "iou", "index": "", "value": _number(result.iou)},
    ]
    rows += [
        {"metric": "slice_dice", "index": offset, "value": _number(value)}
        for offset, value in result.per_slice
    ]
    return rows
