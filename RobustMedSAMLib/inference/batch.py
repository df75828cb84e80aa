"""Batch segmentation: many cases, several worker processes, several machines.

A *case* is a volume plus Slicer markups prompts and an output file name. Cases come
from a CSV (``read_cases("cases.csv")``, columns ``CASE_COLUMNS``) or a folder of
volumes with side files (``VOLUME_points.mrk.json``, ``VOLUME_negative.mrk.json``,
``VOLUME_box.mrk.json``). Every case's result lands in one output folder:

- ``OUT`` (segmentation) and ``OUT.json`` (its run record), each written atomically;
  a case whose two files exist is finished and skipped by a re-run;
- ``OUT.error.json`` when the case failed (removed once it succeeds); the other cases
  go on;
- ``batch_summary.json``: done / failed / pending over all cases (``write_status``).

Case ``i`` belongs to rank ``i % WORLD_SIZE`` (torchrun's variables; see
``RobustMedSAMLib.distributed``); within a rank, ``workers`` processes (spawned, each
loading the model once) take that rank's cases from a shared queue.

    cases = read_cases("cases.csv")
    summary = run_batch(cases, "out", SegmentSettings(model="robustsam", checkpoint=ckpt))
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from RobustMedSAMLib.distributed import DistInfo, dist_info, shard, threads_per_worker
from RobustMedSAMLib.errors import CancelledError, InputError, OutputError, RobustMedSAMError
from RobustMedSAMLib.formats.atomic import (
    check_not_an_input,
    check_writable,
    full_suffix,
    write_json,
)
from RobustMedSAMLib.formats.segmentation import OUTPUT_SUFFIXES as OUT_SUFFIXES
from RobustMedSAMLib.formats.segmentation import write_case
from RobustMedSAMLib.formats.volume import VOLUME_SUFFIXES, check_image_file, volume_name
from RobustMedSAMLib.names import (
    DEFAULT_LIKENESS,
    DEFAULT_MODEL,
    DEFAULT_OVERLAP,
    DEFAULT_STABILITY,
    SEED_BOX_GROWTH,
)
from RobustMedSAMLib.progress import Progress

log = logging.getLogger(__name__)

CASE_COLUMNS = ("volume", "points", "negative", "box", "out")
SIDE_FILES = {"points": "_points.mrk.json", "negative": "_negative.mrk.json",
              "box": "_box.mrk.json"}  # fmt: skip
SUMMARY_NAME = "batch_summary.json"


# --- cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchCase:
    """One volume (file or DICOM folder) with its prompt files (None: not given) and the
    output file name inside the output folder (``.seg.nrrd`` or a label map)."""

    volume: Path
    points: Path | None = None
    negative: Path | None = None
    box: Path | None = None
    out: str = ""

    @property
    def name(self) -> str:
        return self.out


def read_cases(source: str | os.PathLike) -> list[BatchCase]:
    """Cases from a CSV file or a folder (see the module docstring), in a fixed order.

    CSV: a header with ``volume`` and any of ``points``, ``negative``, ``box``, ``out``;
    relative paths are relative to the CSV's folder; ``out`` defaults to the volume's
    name + ``.seg.nrrd``. Raises InputError for a malformed list (not a text CSV, a
    missing column, a case without prompt, an output name that is not a plain file name,
    duplicate output names, a volume file that is not an image); a missing volume only
    fails that case.
    """
    source = Path(source)
    if source.is_dir():
        cases = _cases_from_folder(source)
    elif source.is_file():
        cases = _cases_from_csv(source)
    else:
        raise InputError(f"case list not found: {source} (give a CSV file or a folder)")
    if not cases:
        raise InputError(f"no cases in {source}: see `robustmedsam segment --help` for the layout")
    _check_outputs(cases)
    for case in cases:
        check_image_file(case.volume)
    return cases


def _cases_from_csv(path: Path) -> list[BatchCase]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return _cases_from_rows(path, handle)
    except (UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path} is not a CSV case list ({error})") from None
    except OSError as error:
        raise InputError(f"cannot read case list {path}: {error.strerror}") from None


def _cases_from_rows(path: Path, handle) -> list[BatchCase]:
    reader = csv.DictReader(handle)
    columns = [c.strip() for c in reader.fieldnames or []]
    unknown = sorted(set(columns) - set(CASE_COLUMNS))
    if "volume" not in columns or unknown or len(set(columns)) != len(columns):
        raise InputError(
            f"{path}: the header must name a 'volume' column and only these, once each: "
            f"{', '.join(CASE_COLUMNS)} (got {_shorten(', '.join(columns)) or 'nothing'})"
        )
    rows = []
    for row in reader:
        extra = row.pop(None, None)  # values beyond the header's columns
        if extra and any(v.strip() for v in extra):
            raise InputError(f"{path} line {reader.line_num}: more values than columns")
        rows.append({k.strip(): (v or "").strip() for k, v in row.items() if k})

    def where(text: str) -> Path | None:
        return None if not text else (path.parent / text).expanduser()

    cases = []
    for line, row in enumerate(rows, start=2):
        if not row.get("volume"):
            raise InputError(f"{path} line {line}: no volume")
        volume = where(row["volume"])
        out = row.get("out") or f"{volume_name(volume)}.seg.nrrd"
        case = BatchCase(volume, where(row.get("points", "")), where(row.get("negative", "")),
                         where(row.get("box", "")), out)  # fmt: skip
        if case.points is None and case.box is None:
            raise InputError(f"{path} line {line}: no prompt (give points and/or box)")
        cases.append(case)
    return cases


def _shorten(text: str, limit: int = 80) -> str:
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cases_from_folder(folder: Path) -> list[BatchCase]:
    """Each ``STEM_points.mrk.json`` / ``STEM_box.mrk.json`` names a case; its volume is
    ``STEM`` + a volume extension, or a DICOM folder ``STEM``."""
    stems = set()
    for kind in ("points", "box"):
        suffix = SIDE_FILES[kind]
        stems |= {p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")}
    cases = []
    for stem in sorted(stems):
        volume = _find_volume(folder, stem)
        sides = {k: folder / f"{stem}{s}" for k, s in SIDE_FILES.items()}
        present = {k: (p if p.is_file() else None) for k, p in sides.items()}
        cases.append(BatchCase(volume, **present, out=f"{stem}.seg.nrrd"))
    return cases


def _find_volume(folder: Path, stem: str) -> Path:
    found = [folder / f"{stem}{s}" for s in VOLUME_SUFFIXES if (folder / f"{stem}{s}").is_file()]
    if (folder / stem).is_dir():
        found.append(folder / stem)
    if len(found) != 1:
        what = "no volume" if not found else f"{len(found)} volumes"
        raise InputError(
            f"{folder}: prompts for {stem!r} but {what} named {stem} + one of "
            f"{', '.join(VOLUME_SUFFIXES)} (or a DICOM folder {stem}/)"
        )
    return found[0]


def _check_outputs(cases: Sequence[BatchCase]) -> None:
    seen: set[str] = set()
    for case in cases:
        if not _plain_name(case.out):
            raise InputError(
                f"output name {_shorten(case.out)!r}: give a plain file name (letters, digits, "
                "'-', '_', '.', spaces; no folder, not starting with '.')"
            )
        if full_suffix(case.out) not in OUT_SUFFIXES:
            raise InputError(f"output name {case.out!r}: end it in {', '.join(OUT_SUFFIXES)}")
        if case.out in seen:
            raise InputError(f"two cases write {case.out}: give each a distinct out name")
        seen.add(case.out)


def _plain_name(name: str) -> bool:
    """A file name that stays inside the output folder on any system."""
    forbidden = set('/\\:*?"<>|')
    return (
        bool(name)
        and not name.startswith(".")
        and name == name.strip()
        and len(name.encode("utf-8", "surrogatepass")) <= 200
        and all(c.isprintable() and c not in forbidden for c in name)
    )


def check_inputs_kept(cases: Sequence[BatchCase], out_dir: str | os.PathLike) -> None:
    """InputError when a case's output or record in ``out_dir`` is an input file of any
    case (a case list beside its volumes, written into the same folder)."""
    inputs = {f"the {kind} of case {case.name}": getattr(case, kind)
              for case in cases for kind in ("volume", "points", "negative", "box")}  # fmt: skip
    outputs = [path for case in cases for path in output_paths(Path(out_dir), case)[:2]]
    check_not_an_input(outputs, inputs)


# --- files of a case --------------------------------------------------------------------


def output_paths(out_dir: Path, case: BatchCase) -> tuple[Path, Path, Path]:
    """``(segmentation, record, error record)`` of a case."""
    out = Path(out_dir) / case.out
    return out, out.with_name(out.name + ".json"), out.with_name(out.name + ".error.json")


def is_finished(out_dir: Path, case: BatchCase) -> bool:
    """Both the segmentation and its record exist (the record is written last)."""
    out, record, _ = output_paths(out_dir, case)
    return out.is_file() and record.is_file()


def remove_temporaries(out_dir: Path, case: BatchCase) -> int:
    """Delete temporary files a crashed run left for this case (``atomic_output`` names
    them ``.OUT.*``). Only the process that owns the case calls this. Returns the count."""
    stale = glob.glob(os.path.join(glob.escape(str(out_dir)), f".{glob.escape(case.out)}.*"))
    for name in stale:
        Path(name).unlink(missing_ok=True)
    return len(stale)


# --- segmenting one case ----------------------------------------------------------------


@dataclass(frozen=True)
class SegmentSettings:
    """Everything but the case: model, device, slicing and propagation options (the
    ``robustmedsam segment`` flags). Picklable, so worker processes get a copy."""

    model: str = DEFAULT_MODEL
    checkpoint: Path | None = None
    encoder: Path | None = None
    decoder: Path | None = None
    device: str = "auto"
    half: bool = False
    fast_cpu: bool = False
    engine: str = "eager"
    axis: str = "axial"
    propagate: bool = False
    zoom: bool | str = "auto"  # True: always with a box; False: never; "auto": small boxes
    projection: str = "mask"
    iou_threshold: float = DEFAULT_OVERLAP
    min_score: float = 0.0
    min_likeness: float = DEFAULT_LIKENESS  # 0: off
    min_stability: float = DEFAULT_STABILITY  # 0: off
    seed_box_growth: float = SEED_BOX_GROWTH  # a drawn box's growth (0: off)
    refine_steps: int | None = None  # None: the pipeline's default (propagation.py)
    bounds: tuple[int, int] | None = None
    slice_step: int = 1  # propagation asks every N-th slice, fills the rest
    encode_ahead: int = 2  # session.ENCODE_AHEAD: slices encoded on a worker thread ahead
    window: tuple[float, float] | str | None = None  # None: chosen from each volume
    segment_name: str = "Segment_1"
    cache_dir: Path | None = None
    server: str | None = None
    token: str | None = None
    token_file: Path | None = None

    def options(self):
        """The SegmentOptions (validated)."""
        from RobustMedSAMLib.inference.preprocessing import parse_window
        from RobustMedSAMLib.inference.propagation import PropagationOptions
        from RobustMedSAMLib.inference.segment_volume import SegmentOptions

        options = SegmentOptions(
            propagate=self.propagate,
            zoom=self.zoom,
            encode_ahead=self.encode_ahead,
            seed_box_growth=self.seed_box_growth,
            propagation=PropagationOptions(
                projection=self.projection,
                iou_threshold=self.iou_threshold,
                min_score=self.min_score,
                min_likeness=self.min_likeness,
                min_stability=self.min_stability,
                refine_steps=self.refine_steps,
                bounds=tuple(self.bounds) if self.bounds else None,
                slice_step=self.slice_step,
            ),
        )
        options.validate()
        if self.window is not None:
            parse_window(self.window)
        return options

    def check_model_files(self) -> None:
        """Fail early (CheckpointError / InputError) when a checkpoint file is missing,
        without loading it: a batch should not start N workers to find that out."""
        from RobustMedSAMLib.weights.registry import resolve_checkpoint

        if self.server is not None:
            return  # the server's model

        parts = [p for p in (self.encoder, self.decoder) if p is not None]
        if parts:
            for part in parts:
                if not Path(part).is_file():
                    raise InputError(f"checkpoint not found: {part}")
        else:
            resolve_checkpoint(self.model, self.checkpoint)


def read_prompts(points: Path | None, negative: Path | None, box: Path | None):
    """VolumePrompts (RAS) from markups files; InputError without points or box."""
    from RobustMedSAMLib.formats.markups import read_points, read_roi
    from RobustMedSAMLib.inference.segment_volume import VolumePrompts

    if not (points or box):
        raise InputError("no prompt: give --points and/or --box (Slicer markups files)")
    return VolumePrompts(
        positive=read_points(points) if points else None,
        negative=read_points(negative) if negative else None,
        roi=read_roi(box) if box else None,
    )


class CaseSegmenter:
    """A model loaded once, segmenting volumes into files with ``SegmentSettings``."""

    def __init__(self, settings: SegmentSettings, device: str | None = None) -> None:
        from RobustMedSAMLib.inference.loader import load_named_model

        self.settings, self.options = settings, settings.options()
        s = settings
        self.loaded = load_named_model(
            s.model,
            s.checkpoint,
            s.encoder,
            s.decoder,
            device or s.device,
            s.half,
            s.fast_cpu,
            s.engine,
        )
        self._model_info: dict[str, Any] | None = None

    def segment(self, volume, prompts, volume_path: Path, progress: Progress | None = None):
        """Segment ``volume`` (a Volume) from ``prompts``: ``(result, record, session)``."""
        from RobustMedSAMLib.inference.segment_volume import run_record, segment_volume
        from RobustMedSAMLib.inference.session import ONE_PASS_CACHE_BYTES, SegmentationSession

        s = self.settings
        session = SegmentationSession(
            volume,
            self.loaded.predictor(),
            s.axis,
            s.window if isinstance(s.window, str | None) else tuple(s.window),
            cache_bytes=ONE_PASS_CACHE_BYTES,
            disk_cache=s.cache_dir,
            model_id=_model_id(self.loaded.checkpoints),
        )
        result = segment_volume(session, prompts, self.options, progress=progress)
        inputs = {
            "volume": str(volume_path),
            "axis": s.axis,
            "window": list(session.window),
            "window_source": session.window_source,
        }
        record = run_record(result, prompts, self.options, self.model_info(), inputs)
        return result, record, session

    def model_info(self) -> dict[str, Any]:
        """Name, preprocessing, device, the encoder's precision and checkpoint files with
        SHA-256 (hashed once)."""
        if self._model_info is None:
            from RobustMedSAMLib.formats.atomic import sha256_of

            files = self.loaded.checkpoints
            self._model_info = {
                "name": self.loaded.name,
                "preprocessing": self.loaded.preprocessing,
                "device": str(self.loaded.model.device),
                "precision": self.loaded.precision,
                "files": {k: {"path": str(p), "sha256": sha256_of(p)} for k, p in files.items()},
            }
        return self._model_info

    def write(
        self,
        out: Path,
        result,
        volume,
        record: dict[str, Any],
    ) -> None:
        """Write the segmentation, then its record ``OUT.json`` (each atomically)."""
        write_case(out, result.mask, volume, record, self.settings.segment_name)


def make_segmenter(settings: SegmentSettings, device: str | None = None):
    """A CaseSegmenter, or with ``settings.server`` a RemoteCaseSegmenter (same calls)."""
    if settings.server is not None:
        from RobustMedSAMLib.server.remote import RemoteCaseSegmenter

        return RemoteCaseSegmenter(settings)
    return CaseSegmenter(settings, device)


def _model_id(files: dict[str, Path]) -> str:
    """Cheap identity of the checkpoint files (path, size, mtime) for the disk cache key."""
    parts = []
    for key, path in sorted(files.items()):
        stat = Path(path).stat()
        parts.append(f"{key}={Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return ";".join(parts)


# --- outcomes and summary ---------------------------------------------------------------


@dataclass
class CaseOutcome:
    """What happened to one case in this run: done, skipped (finished before) or failed."""

    case: str
    status: str
    seconds: float = 0.0
    error: str = ""


@dataclass
class BatchSummary:
    """This process's share: its rank of ``world``, local ``workers``, the outcomes."""

    rank: int = 0
    world: int = 1
    workers: int = 1
    seconds: float = 0.0
    outcomes: list[CaseOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def line(self) -> str:
        where = f"rank {self.rank} of {self.world}, " if self.world > 1 else ""
        return (
            f"{where}{self.workers} worker(s): {self.count('done')} done, "
            f"{self.count('skipped')} already done, {self.count('failed')} failed "
            f"in {self.seconds:.1f} s"
        )


def case_status(out_dir: Path, cases: Sequence[BatchCase]) -> dict[str, Any]:
    """Done, failed (with their errors) and pending cases, read from the output folder."""
    done, failed, pending = [], [], []
    for case in cases:
        _, _, error = output_paths(out_dir, case)
        if is_finished(out_dir, case):
            done.append(case.name)
        elif error.is_file():
            try:
                failed.append(json.loads(error.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                failed.append({"case": case.name, "error": "unreadable error record"})
        else:
            pending.append(case.name)
    return {"cases": len(cases), "done": done, "failed": failed, "pending": pending}


def write_status(out_dir: str | os.PathLike, cases: Sequence[BatchCase]) -> dict[str, Any]:
    """Write ``batch_summary.json`` (``case_status``) atomically and return it."""
    status = case_status(Path(out_dir), cases)
    write_json(Path(out_dir) / SUMMARY_NAME, status)
    return status


# --- running ----------------------------------------------------------------------------


def run_batch(
    cases: Sequence[BatchCase],
    out_dir: str | os.PathLike,
    settings: SegmentSettings,
    workers: int = 1,
    info: DistInfo | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> BatchSummary:
    """Segment this rank's share of ``cases`` into ``out_dir`` with ``workers`` processes.

    Finished cases are skipped; a failing case writes ``OUT.error.json`` and the others
    go on. ``progress(done, total)`` counts this rank's cases. ``cancel`` is checked
    between cases (in-process runs): CancelledError, finished cases stay.
    Raises InputError / CheckpointError before any work for a bad folder or model.
    """
    start = time.perf_counter()
    info = info or dist_info()
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"output folder does not exist: {out_dir}")
    if workers < 1:
        raise InputError("--workers must be >= 1")
    check_writable(out_dir)
    settings.options()
    settings.check_model_files()
    mine = shard(cases, info.rank, info.world)
    summary = BatchSummary(info.rank, info.world, workers)
    todo = []
    for case in mine:
        if is_finished(out_dir, case):
            summary.outcomes.append(CaseOutcome(case.name, "skipped"))
        else:
            todo.append(case)
    total = len(mine)

    def report(outcome: CaseOutcome) -> None:
        summary.outcomes.append(outcome)
        if progress is not None:
            progress(len(summary.outcomes), total)

    if progress is not None:
        progress(len(summary.outcomes), total)
    log.info("%d of %d cases to do here (%d already done)", len(todo), total, total - len(todo))
    here = info.local_world * workers
    if todo and workers == 1:
        _run_here(todo, out_dir, settings, info, here, report, cancel)
    elif todo:
        _run_pool(todo, out_dir, settings, workers, info, report)
    summary.seconds = time.perf_counter() - start
    return summary


def _run_here(todo, out_dir, settings, info, here, report, cancel) -> None:
    if here > 1:
        import torch

        torch.set_num_threads(threads_per_worker(here))
    from RobustMedSAMLib.distributed import worker_device

    segmenter = make_segmenter(settings, worker_device(settings.device, info.local_rank))
    for case in todo:
        if cancel is not None and cancel():
            raise CancelledError("batch cancelled; finished cases are kept")
        report(process_case(segmenter, case, out_dir, info))


def _run_pool(todo, out_dir, settings, workers, info, report) -> None:
    """Spawned processes, each loading the model once, take cases from a shared queue."""
    import multiprocessing
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for slot in range(workers):
        slots.put(info.local_rank * workers + slot)
    threads = threads_per_worker(info.local_world * workers)
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker,
        initargs=(settings, slots, threads),
    ) as pool:  # fmt: skip
        futures = {pool.submit(_worker_case, case, out_dir, info): case for case in todo}
        for future in as_completed(futures):
            case = futures[future]
            try:
                report(future.result())
            except BrokenProcessPool:
                report(CaseOutcome(case.name, "failed", error="a worker process died"))
            except OutputError:
                raise  # the output folder takes no more files: the other cases would fail too
            except Exception as error:  # noqa: BLE001 - a failed case must not stop the rest
                report(CaseOutcome(case.name, "failed", error=f"{type(error).__name__}: {error}"))


# A worker process's own model, set by ``_init_worker`` (one per spawned process).
_worker: dict[str, Any] = {}


def _init_worker(settings: SegmentSettings, slots, threads: int) -> None:
    import torch

    from RobustMedSAMLib.distributed import worker_device

    torch.set_num_threads(threads)
    slot = slots.get()
    try:
        _worker["segmenter"] = make_segmenter(settings, worker_device(settings.device, slot))
    except Exception as error:  # noqa: BLE001 - reported with every case of this worker
        _worker["error"] = error


def _worker_case(case: BatchCase, out_dir: Path, info: DistInfo) -> CaseOutcome:
    if "error" in _worker:
        error = _worker["error"]
        _record_failure(out_dir, case, error, info)
        return CaseOutcome(case.name, "failed", error=f"{type(error).__name__}: {error}")
    return process_case(_worker["segmenter"], case, out_dir, info)


def process_case(
    segmenter: CaseSegmenter, case: BatchCase, out_dir: Path, info: DistInfo
) -> CaseOutcome:
    """Segment one case into its files; any error becomes a failed outcome and an
    ``OUT.error.json`` (CancelledError and KeyboardInterrupt propagate)."""
    from RobustMedSAMLib.formats.volume import read_volume

    start = time.perf_counter()
    out, _, error_path = output_paths(out_dir, case)
    remove_temporaries(out_dir, case)
    try:
        volume = read_volume(case.volume)
        prompts = read_prompts(case.points, case.negative, case.box)
        result, record, _ = segmenter.segment(volume, prompts, case.volume)
        record["batch"] = _where(info)
        segmenter.write(out, result, volume, record)
    except (CancelledError, KeyboardInterrupt, OutputError):
        raise  # OutputError: the folder takes no more files; finished cases are kept
    except Exception as error:  # noqa: BLE001 - a failed case must not stop the rest
        log.warning("case %s failed: %s", case.name, error)
        _record_failure(out_dir, case, error, info)
        return CaseOutcome(case.name, "failed", time.perf_counter() - start, str(error))
    error_path.unlink(missing_ok=True)
    return CaseOutcome(case.name, "done", time.perf_counter() - start)


def _where(info: DistInfo) -> dict[str, Any]:
    return {"rank": info.rank, "world": info.world, "host": socket.gethostname(),
            "pid": os.getpid()}  # fmt: skip


def _record_failure(out_dir: Path, case: BatchCase, error: BaseException, info: DistInfo) -> None:
    _, _, path = output_paths(out_dir, case)
    value = {"case": case.name, "volume": str(case.volume), "error": str(error),
             "type": type(error).__name__, **_where(info), "time": time.time()}  # fmt: skip
    try:
        write_json(path, value)
    except OutputError:
        raise
    except (OSError, RobustMedSAMError) as write_error:
        log.error("cannot record the failure of %s: %s", case.name, write_error)
