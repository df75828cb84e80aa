"""Batch segmentation: many cases over worker processes and ranks, resumable after a crash.

Real processes throughout (spawned workers, subprocesses given RANK / WORLD_SIZE, a
SIGKILL mid-case), a tiny random robust checkpoint and small phantom volumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from volumes import centre_ras, oblique

from RobustMedSAMLib.cli import main
from RobustMedSAMLib.datasets.phantoms import sphere
from RobustMedSAMLib.distributed import dist_info, shard, threads_per_worker
from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.markups import write_points
from RobustMedSAMLib.formats.segmentation import read_segmentation
from RobustMedSAMLib.formats.volume import write_volume
from RobustMedSAMLib.inference.batch import SUMMARY_NAME, read_cases

ROOT = Path(__file__).resolve().parents[2]
NAMES = [f"case{i}" for i in range(5)]


@pytest.fixture
def folder(tmp_path):
    """Five small volumes, each with a ``_points.mrk.json`` side file."""
    data = tmp_path / "data"
    data.mkdir()
    for i, name in enumerate(NAMES):
        phantom = sphere((4, 32, 32), spacing=(1.0, 1.0, 2.0), radius=6.0 + i)
        volume = oblique(phantom)
        write_volume(volume, data / f"{name}.nrrd")
        write_points(data / f"{name}_points.mrk.json", centre_ras(volume, phantom.mask))
    return data


def model_args(tiny_checkpoints) -> list[str]:
    ckpt = str(tiny_checkpoints["robust"])
    return ["--model", "robustsam", "--checkpoint", ckpt, "--device", "cpu"]


def batch(cases, out, tiny_checkpoints, *extra) -> int:
    args = ["segment", "--cases", str(cases), "--out-dir", str(out)]
    return main([*args, *model_args(tiny_checkpoints), *extra])


# Run the CLI in a subprocess; with kill_at, the process SIGKILLs itself after writing that
# case's segmentation and before its record (the worst moment for a crash).
KILL_DRIVER = """
import os, signal, sys
import RobustMedSAMLib.formats.segmentation as segmentation
from RobustMedSAMLib.cli import main
write_json, kill_at = segmentation.write_json, os.environ["KILL_AT"]
def crash_before_record(path, value):
    if str(path).endswith(kill_at + ".json"):
        os.kill(os.getpid(), signal.SIGKILL)
    write_json(path, value)
segmentation.write_json = crash_before_record
sys.exit(main(sys.argv[1:]))
"""


def subprocess_batch(cases, out, tiny_checkpoints, kill_at=None, **env) -> subprocess.Popen:
    args = ["segment", "--cases", str(cases), "--out-dir", str(out)]
    runner = ["-c", KILL_DRIVER] if kill_at else ["-m", "RobustMedSAMLib"]
    if kill_at:
        env["KILL_AT"] = kill_at
    command = [sys.executable, *runner, *args, *model_args(tiny_checkpoints)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    environment.pop("MASTER_ADDR", None)
    return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def records(out: Path) -> dict[str, dict]:
    return {
        name: json.loads((out / f"{name}.seg.nrrd.json").read_text())
        for name in NAMES
        if (out / f"{name}.seg.nrrd.json").is_file()
    }


def assert_complete(out: Path) -> None:
    """Every case once: a segmentation + record each, nothing else but the summary."""
    expected = {f"{n}.seg.nrrd" for n in NAMES} | {f"{n}.seg.nrrd.json" for n in NAMES}
    assert {p.name for p in out.iterdir()} == expected | {SUMMARY_NAME}
    for name in NAMES:
        labelmap, segments = read_segmentation(out / f"{name}.seg.nrrd")
        assert labelmap.shape == (4, 32, 32) and segments[0].name == "Segment_1"
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert sorted(summary["done"]) == sorted(f"{n}.seg.nrrd" for n in NAMES)
    assert summary["failed"] == [] and summary["pending"] == []


def test_two_worker_processes_write_every_case_once(folder, tmp_path, tiny_checkpoints, capsys):
    out = tmp_path / "out"
    assert batch(folder, out, tiny_checkpoints, "--workers", "2") == 0
    assert_complete(out)
    assert "5 done, 0 already done, 0 failed" in capsys.readouterr().out
    assert {r["inputs"]["volume"] for r in records(out).values()} == {
        str(folder / f"{n}.nrrd") for n in NAMES
    }
    assert batch(folder, out, tiny_checkpoints, "--workers", "2") == 0  # nothing to do
    assert "0 done, 5 already done" in capsys.readouterr().out


def test_a_failing_case_is_recorded_and_the_others_finish(folder, tmp_path, tiny_checkpoints):
    points = folder / "case2_points.mrk.json"
    good = points.read_text()
    points.write_text("{not json")
    out = tmp_path / "out"
    assert batch(folder, out, tiny_checkpoints) == 1
    error = json.loads((out / "case2.seg.nrrd.error.json").read_text())
    assert error["case"] == "case2.seg.nrrd" and "case2_points.mrk.json" in error["error"]
    assert set(records(out)) == set(NAMES) - {"case2"}
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert [f["case"] for f in summary["failed"]] == ["case2.seg.nrrd"]
    before = {n: (out / f"{n}.seg.nrrd").stat().st_mtime_ns for n in records(out)}

    points.write_text(good)
    assert batch(folder, out, tiny_checkpoints) == 0
    assert_complete(out)  # the error record is gone
    assert {n: (out / f"{n}.seg.nrrd").stat().st_mtime_ns for n in before} == before


def test_killed_run_resumes_each_case_exactly_once(folder, tmp_path, tiny_checkpoints):
    out = tmp_path / "out"
    killed = subprocess_batch(folder, out, tiny_checkpoints, kill_at="case2.seg.nrrd")
    _, err = killed.communicate(timeout=120)
    assert killed.returncode == -9, err
    assert set(records(out)) == {"case0", "case1"}  # case2: segmentation, no record
    assert (out / "case2.seg.nrrd").is_file()
    (out / ".case3.seg.nrrd.x1y2z3.seg.nrrd").write_bytes(b"half a file")  # crashed writer
    first = {n: (out / f"{n}.seg.nrrd.json").read_text() for n in ("case0", "case1")}

    assert batch(folder, out, tiny_checkpoints) == 0
    assert_complete(out)  # no temporary file left
    assert {n: (out / f"{n}.seg.nrrd.json").read_text() for n in first} == first


def test_two_ranks_split_the_cases_without_overlap(folder, tmp_path, tiny_checkpoints):
    out = tmp_path / "out"
    ranks = [
        subprocess_batch(folder, out, tiny_checkpoints, RANK=str(r), WORLD_SIZE="2")
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs
    assert "rank 0 of 2, 1 worker(s): 3 done" in outputs[0][0]
    assert "rank 1 of 2, 1 worker(s): 2 done" in outputs[1][0]
    written_by = {name: r["batch"]["rank"] for name, r in records(out).items()}
    assert written_by == {name: i % 2 for i, name in enumerate(NAMES)}
    assert batch(folder, out, tiny_checkpoints, "--status") == 0
    assert_complete(out)


def test_case_list_csv_relative_paths_and_out_names(folder, tmp_path, tiny_checkpoints):
    (folder / "list.csv").write_text(
        "volume,points,out\ncase0.nrrd,case0_points.mrk.json,first.nii.gz\n"
        "case1.nrrd,case1_points.mrk.json,\n"
    )
    cases = read_cases(folder / "list.csv")
    assert [c.out for c in cases] == ["first.nii.gz", "case1.seg.nrrd"]
    assert cases[0].volume == folder / "case0.nrrd" and cases[0].box is None
    out = tmp_path / "out"
    assert batch(folder / "list.csv", out, tiny_checkpoints) == 0
    assert (out / "first.nii.gz").is_file() and (out / "case1.seg.nrrd.json").is_file()


@pytest.mark.parametrize(
    "text, message",
    [
        ("image,points\na.nrrd,p.mrk.json\n", "'volume' column"),
        ("volume,points,box\na.nrrd,,\n", "line 2: no prompt"),
        ("volume,points,out\na.nrrd,p.mrk.json,x.seg.nrrd\nb.nrrd,p.mrk.json,x.seg.nrrd\n",
         "two cases write x.seg.nrrd"),
        ("volume,points,out\na.nrrd,p.mrk.json,sub/x.seg.nrrd\n", "plain file name"),
    ],
)  # fmt: skip
def test_bad_case_list_is_a_clear_error(tmp_path, text, message):
    (tmp_path / "list.csv").write_text(text)
    with pytest.raises(InputError, match=message):
        read_cases(tmp_path / "list.csv")


def test_folder_prompts_without_a_volume_is_a_clear_error(folder):
    (folder / "case0.nrrd").unlink()
    with pytest.raises(InputError, match="prompts for 'case0' but no volume"):
        read_cases(folder)


def test_rank_environment_and_sharding():
    info = dist_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (info.rank, info.world, info.local_rank, info.local_world) == (3, 4, 1, 2)
    assert not info.main and info.distributed and not info.rendezvous
    assert dist_info({}).main and not dist_info({}).distributed
    with pytest.raises(ValueError, match="RANK < WORLD_SIZE"):
        dist_info({"RANK": "2", "WORLD_SIZE": "2"})
    items = list(range(11))
    shards = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == items and shards[1] == [1, 4, 7, 10]
    assert threads_per_worker(2, cores=16) == 8 and threads_per_worker(4, cores=2) == 1
