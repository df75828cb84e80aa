"""Scale-out on this machine: fine-tuning with 1 and 2 gloo processes (torchrun), and
``evaluate`` with 1 and 2 worker processes, in the same run.

Fine-tuning: the same config and global batch; 1 process with 1 torch thread and with
one per core, 2 processes with torchrun's default OMP_NUM_THREADS=1 each.
Throughput is the runner's own ``samples_per_s`` at the last step (training steps
only: start-up, data and cache are not counted). Evaluation: wall time of the whole
command (process start-up and model loading included), 1 vs 2 workers.

    .venv/bin/python Testing/benchmarks/bench_distributed.py [--steps 20] [--mode full]
        [--batch 8] [--no-evaluate]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def command(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "RobustMedSAMLib"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            f"--master_port={free_port()}", "-m", "RobustMedSAMLib"]  # fmt: skip


def environment(threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "RANK", "WORLD_SIZE")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def finetune_rate(config: Path, out: Path, processes: int, threads: int | None) -> float:
    """Samples per second of the global batch over the training steps."""
    done = subprocess.run([*command(processes), "finetune", str(config), "--out", str(out)],
                          cwd=ROOT, env=environment(threads), capture_output=True, text=True,
                          check=True)  # fmt: skip
    steps = [json.loads(x) for x in done.stdout.splitlines() if x.startswith('{"event": "step"')]
    return steps[-1]["samples_per_s"]


def evaluate_seconds(out: Path, workers: int, checkpoint: Path) -> float:
    args = ["evaluate", "--model", f"robustsam:{checkpoint}", "--data",
            "phantom:sphere,size=24,count=8", "--corruptions", "clean", "gaussian_noise",
            "--severities", "1", "3", "--seeds", "0", "--prompt", "box", "--projection",
            "mask", "--clicks", "2", "--device", "cpu", "--no-progress", "--out", str(out),
            "--workers", str(workers)]  # fmt: skip
    start = time.perf_counter()
    subprocess.run([*command(1), *args], cwd=ROOT, env=environment(None), check=True,
                   capture_output=True)  # fmt: skip
    return time.perf_counter() - start


def write_config(folder: Path, mode: str, steps: int, batch: int) -> Path:
    sys.path.insert(0, str(ROOT))
    from RobustMedSAMLib.training.config import TrainingConfig

    values = {
        "model": {"init": "random", "size": "tiny", "robust": True},
        "train": {
            "mode": mode,
            "steps": steps,
            "batch_size": batch,
            "lr": 1e-4,
            "val_every": 10_000,
            "checkpoint_every": 10_000,
            "log_every": 1,
        },  # fmt: skip
        "data": {"phantom_volumes": 3, "phantom_shape": [12, 64, 64], "val_samples": 4},
        "corruption": {"variants": 2},
        "prompts": {"corrections": 1},
    }
    path = folder / "config.toml"
    path.write_text(TrainingConfig.from_dict(values).to_toml())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mode", default="full", choices=("decoder", "full"))
    parser.add_argument("--no-evaluate", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = write_config(folder, args.mode, args.steps, args.batch)
        cores = os.cpu_count() or 1
        runs = {"1 process x 1 thread": (1, 1), f"1 process x {cores} threads": (1, cores),
                "2 processes x 1 thread": (2, None)}  # fmt: skip
        rates = {name: finetune_rate(config, folder / f"run{i}", *how)
                 for i, (name, how) in enumerate(runs.items())}  # fmt: skip
        print(f"fine-tuning ({args.mode}, TINY model, global batch {args.batch}, "
              f"{args.steps} steps, CPU, {cores} cores)")  # fmt: skip
        for name, rate in rates.items():
            print(f"  {name}: {rate:.1f} samples/s")
        two, ones = rates["2 processes x 1 thread"], list(rates.values())[:2]
        print(
            f"  ratio 2 processes / 1 process: {two / ones[0]:.2f} (1 thread), "
            f"{two / ones[1]:.2f} ({cores} threads)"
        )
        if args.no_evaluate:
            return
        sys.path.insert(0, str(ROOT / "Testing"))
        import torch
        from reference_models import random_state_dict

        from RobustMedSAMLib.model.config import TINY

        checkpoint = folder / "robust.pth"
        torch.save(random_state_dict(TINY, robust=True, seed=2), checkpoint)
        seconds = {n: evaluate_seconds(folder / f"eval{n}", n, checkpoint) for n in (1, 2)}
        print("evaluate (8 phantom volumes 24^3, 40 cells, whole command)")
        for n, s in seconds.items():
            print(f"  {n} worker(s): {s:.1f} s")
        print(f"  ratio 1/2 (speed-up): {seconds[1] / seconds[2]:.2f}")


if __name__ == "__main__":
    main()
