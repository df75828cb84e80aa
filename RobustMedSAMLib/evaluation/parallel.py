"""The evaluation matrix over several processes and machines.

The cases are dealt out like batch segmentation's (``distributed.shard``): case ``i``
goes to worker slot ``i % (WORLD_SIZE x workers)``, where torchrun's rank ``r`` owns
slots ``r x workers ... r x workers + workers - 1`` and runs them as spawned processes
on its machine (torch threads and GPUs split as ``distributed`` says). Each slot
appends its cells to its own part file (``evaluation.shards``); finished cells of any
earlier run are skipped, so a crash loses at most the cell being computed. The parts
are merged into ``results.csv`` by the process that knows every writer has finished:
this one for a single rank, rank 0 after a barrier under torchrun (``commands/evaluate``).

    specs = [parse_model_spec("robustsam:robust.pth")]
    result = run_parallel(specs, cases, "out", MatrixOptions(), device="cpu", workers=2)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from RobustMedSAMLib.distributed import (
    DistInfo,
    dist_info,
    shard,
    threads_per_worker,
    worker_device,
)
from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.evaluation.datasets import Case
from RobustMedSAMLib.evaluation.matrix import MatrixOptions, MatrixResult, run_matrix
from RobustMedSAMLib.evaluation.models import ModelSpec, model_entry
from RobustMedSAMLib.evaluation.timing import CallTimes
from RobustMedSAMLib.progress import Progress

log = logging.getLogger(__name__)


def run_parallel(
    specs: Sequence[ModelSpec],
    cases: Sequence[Case],
    out_dir: str | Path,
    options: MatrixOptions | None = None,
    device: str = "auto",
    workers: int = 1,
    info: DistInfo | None = None,
    progress: Progress | None = None,
    encoder_cache: Path | None = None,
    engine: str = "eager",
) -> MatrixResult:
    """Evaluate this rank's share of ``cases`` with ``workers`` processes
    (``encoder_cache``: a folder shared by all of them; ``engine``: see ``model_entry``).

    One process in all (no torchrun, ``workers`` 1): ``run_matrix`` into results.csv,
    with progress per cell. Otherwise every slot writes its part file; with a single
    rank the parts are merged before returning (``progress`` then counts slots).
    Counts in the result are this rank's.
    """
    info = info or dist_info()
    if workers < 1:
        raise InputError("--workers must be >= 1")
    options = options or MatrixOptions()
    options.validate()
    if not cases:
        raise InputError("no cases to evaluate: check the data specs")
    out_dir = Path(out_dir)
    slots = info.world * workers
    if slots == 1:
        entries = [model_entry(spec, device, encoder_cache, engine) for spec in specs]
        return run_matrix(entries, cases, out_dir, options, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = [info.rank * workers + w for w in range(workers)]
    jobs = [(slot, shard(cases, slot, slots)) for slot in mine]
    jobs = [(slot, share) for slot, share in jobs if share]
    threads = threads_per_worker(info.local_world * workers)
    results: list[MatrixResult] = []
    if progress is not None:
        progress(0, len(jobs))
    encoding = (encoder_cache, engine)
    if workers == 1:
        for slot, share in jobs:
            args = (share, out_dir, options, device, slot, threads, info, workers, encoding)
            results.append(_run_slot(specs, *args))
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(len(jobs) or 1, mp_context=context) as pool:
            futures = [
                pool.submit(
                    _run_slot,
                    specs,
                    *(share, out_dir, options, device, slot, threads, info, workers, encoding),
                )
                for slot, share in jobs
            ]
            for future in futures:
                results.append(future.result())
                if progress is not None:
                    progress(len(results), len(jobs))
    total = _combine(results, out_dir)
    if info.world == 1:
        from RobustMedSAMLib.evaluation.shards import merge_parts

        merge_parts(out_dir)
    return total


def _run_slot(
    specs, cases, out_dir, options, device, slot, threads, info, workers_per_rank, encoding
) -> MatrixResult:
    """One worker slot: its own models on its device, its cases, its part file;
    ``encoding``: ``(encoder_cache, engine)`` as ``model_entry`` takes them."""
    import torch

    torch.set_num_threads(threads)
    local = info.local_rank * workers_per_rank + slot % workers_per_rank  # GPU choice
    entries = [model_entry(spec, worker_device(device, local), *encoding) for spec in specs]
    log.info("slot %d: %d cases", slot, len(cases))
    return run_matrix(entries, cases, out_dir, options, part=f"slot{slot:04d}")


def _combine(results: list[MatrixResult], out_dir: Path) -> MatrixResult:
    from RobustMedSAMLib.evaluation.results_csv import CSV_NAME

    total = MatrixResult(csv_path=out_dir / CSV_NAME)
    for result in results:
        total.computed += result.computed
        total.skipped += result.skipped
        total.failed += result.failed
        total.missing += [m for m in result.missing if m not in total.missing]
        for label, times in result.times.items():
            into = total.times.setdefault(label, CallTimes())
            for name in ("encoder_calls", "encoder_seconds", "decoder_calls", "decoder_seconds"):
                setattr(into, name, getattr(into, name) + getattr(times, name))
    return total
