"""Merge per-model evidence folders into one results.csv for scripts/evidence_tables.py.

    .venv/bin/python scripts/combine_evidence.py OUT.csv FOLDER... [--earlier EARLIER.csv]

Each FOLDER holds a ``results.csv`` written by ``robustmedsam evaluate``. Rows of
``--earlier`` (a previous run's results) are kept only for cells not re-run here; a
re-run cell replaces the earlier one, and the script prints how many re-run cells came
out identical, so carried-over rows are known to match the current code.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

CELL = ("model", "dataset", "modality", "case", "protocol", "prompt", "projection",
        "corruption", "severity", "seed", "metric", "index")  # fmt: skip


def read(path: Path) -> list[dict[str, str]]:
    """The rows of one results.csv."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def combine(folders: list[Path], earlier: Path | None) -> tuple[list[dict], dict[str, int]]:
    """Rows of every folder, plus earlier rows for cells none of them holds."""
    rows = [row for folder in folders for row in read(folder / "results.csv")]
    seen = {tuple(r[k] for k in CELL): r["value"] for r in rows}
    counts = {"identical": 0, "different": 0, "carried": 0}
    for row in read(earlier) if earlier else []:
        value = seen.get(tuple(row[k] for k in CELL))
        if value is None:
            rows.append(row)
            counts["carried"] += 1
        else:
            counts["identical" if value == row["value"] else "different"] += 1
    return rows, counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--earlier", type=Path)
    args = parser.parse_args()
    rows, counts = combine(args.folders, args.earlier)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} rows; earlier cells re-run identical {counts['identical']}, "
          f"different {counts['different']}, carried over {counts['carried']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
