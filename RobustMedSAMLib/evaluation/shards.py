"""Part files of a parallel evaluation and their merge into ``results.csv``.

Each worker process appends its cells to its own ``OUT/parts/NAME.csv`` (same columns
and cell-atomic format as ``results.csv``); no two processes write one file. A worker
skips every cell finished in ``results.csv`` or in any part file. ``merge_parts`` then
writes ``results.csv`` (atomically) as the union: one copy of each complete ``ok``
cell, plus the failure rows of cells no part finished, cells in sorted key order, and
deletes the parts it folded in. Call it only when no worker is writing (after the
pool, or on rank 0 after every rank has finished). A crash between the write and the
deletion only leaves copies that the next merge drops.
"""

from __future__ import annotations

import logging
from pathlib import Path

from RobustMedSAMLib.evaluation.results_csv import CSV_NAME, complete, read_cells, rewrite

log = logging.getLogger(__name__)

PARTS_DIR = "parts"


def part_path(out_dir: Path, name: str) -> Path:
    """``OUT/parts/NAME.csv`` (the folder is created)."""
    folder = Path(out_dir) / PARTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.csv"


def part_files(out_dir: Path) -> list[Path]:
    folder = Path(out_dir) / PARTS_DIR
    return sorted(folder.glob("*.csv")) if folder.is_dir() else []


def finished_elsewhere(out_dir: Path, own: Path) -> set[tuple]:
    """Keys of complete ``ok`` cells in ``results.csv`` and every part file but ``own``
    (read only: other processes may be appending to them)."""
    done: set[tuple] = set()
    for path in [Path(out_dir) / CSV_NAME, *part_files(out_dir)]:
        if path != own:
            done |= {key for key, rows in read_cells(path).items() if complete(rows)}
    return done


def _failure(row: dict) -> bool:
    """A row reporting an error or a missing model (not a torn or unfinished cell)."""
    return (row.get("status") or "").startswith(("error", "missing"))


def merge_parts(out_dir: str | Path) -> int:
    """Fold the part files into ``results.csv`` (see the module docstring); returns the
    number of part files merged (0: nothing to do, the CSV is left as it is)."""
    out_dir = Path(out_dir)
    parts = part_files(out_dir)
    if not parts:
        return 0
    ok: dict[tuple, list[dict]] = {}
    failed: dict[tuple, list[dict]] = {}
    main = out_dir / CSV_NAME
    for path in [main, *parts]:
        for key, rows in read_cells(path).items():
            if complete(rows):
                ok.setdefault(key, rows)
            elif path != main and all(_failure(r) for r in rows):
                failed[key] = rows  # the latest report of a failure (or a missing model)
    merged = {**{k: v for k, v in failed.items() if k not in ok}, **ok}
    rewrite(main, [row for key in sorted(merged) for row in merged[key]])
    for path in parts:
        path.unlink(missing_ok=True)
    try:
        (out_dir / PARTS_DIR).rmdir()
    except OSError:  # not empty: a part written meanwhile stays for the next merge
        pass
    log.info("merged %d part file(s) into %s: %d cells", len(parts), main, len(merged))
    return len(parts)
