"""The evaluation's result store: one CSV row per number, grouped into cells.

A cell is one (model, case, protocol, prompt, projection, corruption, severity, seed)
key (``KEY``). Cells are appended in one write each and are complete when every row
says ``ok`` and the cell's row count; a torn or failed cell is dropped and recomputed,
which makes ``evaluate`` resumable. ``shards`` merges the per-process part files.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

from RobustMedSAMLib.formats.atomic import atomic_output

log = logging.getLogger(__name__)

KEY = ("model", "dataset", "modality", "case", "protocol", "prompt", "projection",
       "corruption", "severity", "seed")  # fmt: skip
COLUMNS = (*KEY, "metric", "index", "value", "cell_rows", "status")
CSV_NAME = "results.csv"


def read_cells(path: Path) -> dict[tuple, list[dict]]:
    """Rows of ``path`` grouped by cell key (file order); a torn last line (a writer
    killed mid-write, or one still writing) makes an incomplete cell, not an error."""
    if not path.is_file():
        return {}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault(tuple(row.get(k) or "" for k in KEY), []).append(row)
    return cells


def complete(rows: list[dict]) -> bool:
    """A finished cell: every row ``ok`` and as many rows as each row says."""
    return all(_row_ok(r, len(rows)) for r in rows)


def finished_cells(path: Path) -> set[tuple]:
    """Keys of complete ``ok`` cells in ``path``; rewrites the file (atomically) without
    any other rows, so an interrupted cell, a missing model or an error is retried."""
    cells = read_cells(path)
    done = {key for key, rows in cells.items() if complete(rows)}
    kept = [r for key, rows in cells.items() if key in done for r in rows]
    dropped = sum(map(len, cells.values())) - len(kept)
    if dropped:
        log.info("dropping %d rows of unfinished, missing or failed cells", dropped)
        rewrite(path, kept)
    return done


def _row_ok(row: dict, count: int) -> bool:
    return row.get("status") == "ok" and row.get("cell_rows") == str(count)


def rewrite(path: Path, rows: list[dict]) -> None:
    with atomic_output(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def append_cell(path: Path, rows: list[dict]) -> None:
    """Append one cell's rows in a single write (header first when the file is new)."""
    if not path.is_file():
        rewrite(path, [])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS)
    for row in rows:
        writer.writerow({**row, "cell_rows": len(rows)})
    with open(path, "a", newline="") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())
