"""Fine-tuning under torchrun, for real: 2 gloo processes on the CPU against 1.

``train.batch_size`` is the global batch: 2 processes take half each, and must train
the weights 1 process trains (to float rounding: the gradient sums differ in order),
resume each other's runs, and leave one set of files (rank 0's) and one cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from RobustMedSAMLib import distributed
from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.model.config import TINY
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.training.batches import share
from RobustMedSAMLib.training.config import TrainingConfig
from RobustMedSAMLib.weights.checkpoint import save_state_dict

ROOT = Path(__file__).resolve().parents[2]
MICRO = dataclasses.replace(
    TINY, image_size=128, window_size=4, encoder_depth=2, encoder_global_attn_indexes=(1,)
)
STEPS = 6
#: How far the weights of 1 and 2 processes may drift apart, as a fraction of how far
#: training moved them. Both runs take the gradient of the same global batch; only the
#: order of float32 sums differs (another split, gloo's reduction, another CPU's BLAS
#: kernels), by at most about n * 2**-24 of the summed magnitudes for n terms (Higham's
#: bound for recursive summation). The widest reduction here is a parameter gradient
#: summed over the global batch and a 32 x 32 low-resolution mask: n = 4 * 32 * 32 =
#: 4096, so 4096 * 6e-8 = 2.4e-4 per step. SGD (momentum 0.9) carries such a difference
#: along linearly, relative to the step it rounds, so the weights stay within that
#: fraction of their movement (1e-3 leaves a factor 4 for the loss's nonlinearity over
#: 6 steps). A wrong split (rank 0's loss alone, gradients not averaged) is off by tens
#: of percent. Adam is not compared: its first steps move each weight by +-lr along the
#: sign of its gradient, so a gradient near zero whose sign flips with rounding moves a
#: weight by 2 * lr whatever the precision (this made the test fail on some CPUs).
RELATIVE_TOLERANCE = 1e-3
#: The global batch's loss is a sum of 4 per-sample losses in another order: a few ulps.
LOSS_TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def finetune(config: Path, out: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    """``robustmedsam finetune`` in 1 process, or under torchrun with ``processes``."""
    if processes == 1:
        launcher = [sys.executable, "-m", "RobustMedSAMLib"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                    f"--master_port={free_port()}", "-m", "RobustMedSAMLib"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    command = [*launcher, "finetune", str(config), "--out", str(out), *extra]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def records(done: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last.safetensors"))


def start_weights(config: Path) -> dict[str, torch.Tensor]:
    return load_file(str(config.parent / "micro.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A micro robust model and a config: decoder mode with the robust feature blocks
    trained (their BatchNorm needs the global batch), corruptions, alignment, corrections."""
    folder = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    checkpoint = save_state_dict(
        SegmentAnythingModel(MICRO, robust=True).state_dict(), folder / "micro.safetensors", MICRO
    )
    values = {
        "model": {"checkpoint": str(checkpoint)},
        "train": {
            "mode": "decoder",
            "steps": STEPS,
            "batch_size": 4,
            "optimizer": "sgd",
            "lr": 0.01,
            "val_every": 100,
            "checkpoint_every": 100,
        },  # fmt: skip
        "data": {"phantom_volumes": 3, "phantom_shape": [10, 48, 48], "val_samples": 6},
        "corruption": {"variants": 2},
        "prompts": {"corrections": 1},
        "loss": {"align": 1.0},
    }
    config = folder / "config.toml"
    config.write_text(TrainingConfig.from_dict(values).to_toml())
    return config


@pytest.fixture(scope="module")
def one(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    return out, finetune(setup, out, 1)


@pytest.fixture(scope="module")
def two(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    return out, finetune(setup, out, 2)


def test_two_processes_train_the_weights_of_one(one, two, setup):
    (run1, done1), (run2, done2) = one, two
    moved = max_difference(weights(run1), start_weights(setup))
    assert moved > 1e-3  # it did train
    assert max_difference(weights(run1), weights(run2)) < RELATIVE_TOLERANCE * moved
    loss1 = [r["loss"] for r in records(done1) if r["event"] == "step"]
    loss2 = [r["loss"] for r in records(done2) if r["event"] == "step"]
    assert len(loss1) == len(loss2) == STEPS
    # the global batch's loss, not rank 0's:
    assert loss2 == pytest.approx(loss1, rel=LOSS_TOLERANCE)


def test_only_rank0_writes_lines_and_files(two):
    run, done = two
    events = [r["event"] for r in records(done)]
    assert events.count("start") == events.count("done") == 1
    steps = [r["step"] for r in records(done) if r["event"] == "step"]
    assert steps == list(range(1, STEPS + 1))
    log = (run / "train.log").read_text()
    assert all(log.count(f"step {s}/{STEPS} ") == 1 for s in range(1, STEPS + 1))
    names = {p.name for p in run.iterdir()}
    assert names == {"config.toml", "train.log", "state.pt", "last.safetensors",
                     "best.safetensors", "cache"}  # fmt: skip


def test_embedding_cache_is_built_once_and_read_by_both_ranks(two):
    run, done = two
    folders = sorted(p.name.split("-")[0] for p in (run / "cache").iterdir())
    assert folders == ["train", "val"]
    for folder in (run / "cache").iterdir():
        files = sorted(p.name for p in folder.iterdir())
        assert "manifest.json" in files
        assert not [n for n in files if n.startswith((".emb", ".early", ".manifest"))]
    assert done.stderr.count("embedding cache train:") == 2  # rank 0 built, rank 1 opened


def test_resume_with_another_number_of_processes(setup, one, tmp_path):
    run1, _ = one
    out = tmp_path / "run"
    stopped = finetune(setup, out, 2, "--stop-after", "3")
    assert records(stopped)[-1]["event"] == "stopped"
    finetune(setup, out, 1, "--resume")
    moved = max_difference(weights(run1), start_weights(setup))
    assert max_difference(weights(out), weights(run1)) < RELATIVE_TOLERANCE * moved


def test_shares_split_a_batch_exactly():
    for batch, world in ((4, 2), (5, 2), (7, 3), (2, 2)):
        shares = [share(batch, world, rank) for rank in range(world)]
        assert [i for s in shares for i in s] == list(range(batch))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_several_ranks_without_torchrun_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert distributed.init_process_group() is False  # batch work: ranks by hand are fine
    with pytest.raises(InputError, match="launch with torchrun"):
        distributed.init_process_group(required=True)
