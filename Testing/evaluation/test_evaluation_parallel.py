"""``robustmedsam evaluate`` over several worker processes: same results as one process,
and a run killed midway then rerun has every cell exactly once."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from RobustMedSAMLib.distributed import DistInfo
from RobustMedSAMLib.evaluation.datasets import load_cases
from RobustMedSAMLib.evaluation.matrix import MatrixOptions
from RobustMedSAMLib.evaluation.models import parse_model_spec
from RobustMedSAMLib.evaluation.parallel import run_parallel
from RobustMedSAMLib.evaluation.results_csv import CSV_NAME, KEY
from RobustMedSAMLib.evaluation.shards import merge_parts, part_path

ROOT = Path(__file__).resolve().parents[2]
DATA = "phantom:sphere,size=16,count=4"
OPTIONS = MatrixOptions(protocols=("interactive",), prompts=("box",), n_corrections=1,
                        corruptions=("clean", "gaussian_noise"), severities=(1, 3),
                        seeds=(0,))  # fmt: skip
CELLS = 4 * 3  # cases x (clean + 2 severities)


def rows_of(out: Path) -> list[tuple]:
    with open(out / CSV_NAME, newline="") as handle:
        return sorted(tuple(row.values()) for row in csv.DictReader(handle))


def cells_of(rows: list[tuple]) -> list[tuple]:
    return [row[: len(KEY)] for row in rows if row[len(KEY)] == "dice" and row[len(KEY) + 1] == "0"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_checkpoints) -> Path:
    out = tmp_path_factory.mktemp("single")
    specs = [parse_model_spec(f"robustsam:{tiny_checkpoints['robust']}")]
    result = run_parallel(specs, load_cases(DATA), out, OPTIONS, device="cpu")
    assert result.computed == CELLS
    return out


def test_two_workers_give_the_rows_of_one(tmp_path, single, tiny_checkpoints):
    specs = [parse_model_spec(f"robustsam:{tiny_checkpoints['robust']}")]
    result = run_parallel(specs, load_cases(DATA), tmp_path, OPTIONS, device="cpu", workers=2)
    assert (result.computed, result.skipped, result.failed) == (CELLS, 0, 0)
    assert rows_of(tmp_path) == rows_of(single)
    assert len(cells_of(rows_of(tmp_path))) == CELLS
    assert not (tmp_path / "parts").exists()  # merged and cleaned up


def test_ranks_write_parts_that_rank0_merges(tmp_path, single, tiny_checkpoints):
    """Two torchrun ranks (given by hand here): each writes only its own part file, the
    merge equals one process's result; a rerun of a rank skips its finished cells."""
    specs = [parse_model_spec(f"robustsam:{tiny_checkpoints['robust']}")]
    cases = load_cases(DATA)
    for rank in (1, 0):
        run_parallel(specs, cases, tmp_path, OPTIONS, "cpu", 1, DistInfo(rank, 2))
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == [
        "slot0000.csv", "slot0001.csv"
    ]  # fmt: skip
    assert not (tmp_path / CSV_NAME).exists()  # ranks do not merge: rank 0 does, at the end
    again = run_parallel(specs, cases, tmp_path, OPTIONS, "cpu", 1, DistInfo(1, 2))
    assert (again.computed, again.skipped) == (0, CELLS // 2)
    assert merge_parts(tmp_path) == 2
    assert rows_of(tmp_path) == rows_of(single)


def test_merge_keeps_one_copy_and_drops_torn_cells(tmp_path, single):
    """A crash after the merged CSV was written but before the parts were deleted, and a
    part whose last cell was cut mid-write: the next merge has every cell once."""
    text = (single / CSV_NAME).read_text()
    (tmp_path / CSV_NAME).write_text(text)
    part = part_path(tmp_path, "slot0000")
    lines = text.splitlines(keepends=True)
    part.write_text("".join(lines) + lines[1][:20])  # all cells again + a torn row
    assert merge_parts(tmp_path) == 1
    assert rows_of(tmp_path) == rows_of(single)


def test_killed_run_then_rerun_has_every_cell_once(tmp_path, single, tiny_checkpoints):
    args = ["evaluate", "--model", f"robustsam:{tiny_checkpoints['robust']}", "--data", DATA,
            "--out", str(tmp_path), "--protocol", "interactive", "--prompt", "box",
            "--clicks", "1", "--corruptions", "clean", "gaussian_noise", "--severities", "1",
            "3", "--seeds", "0", "--device", "cpu", "--no-progress", "--workers", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_ADDR", None)
    process = subprocess.Popen([sys.executable, "-m", "RobustMedSAMLib", *args], cwd=ROOT,
                               env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        parts = list((tmp_path / "parts").glob("*.csv"))
        if sum(len(p.read_text().splitlines()) - 1 for p in parts) >= 3:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the parent and both workers, mid-run
    process.wait()
    assert not (tmp_path / CSV_NAME).exists(), "the run finished before it could be killed"
    done_before = sum(1 for _ in (tmp_path / "parts").glob("*.csv"))
    assert done_before >= 1
    from RobustMedSAMLib.cli import main

    assert main(args[:-2] + ["--workers", "1"]) == 0  # rerun (another layout) folds the parts
    rows = rows_of(tmp_path)
    cells = cells_of(rows)
    assert len(cells) == len(set(cells)) == CELLS
    assert rows == rows_of(single)
