"""bench_gpu.py stays runnable without a GPU: its code paths as a CPU dry run."""

from __future__ import annotations

import re

import bench_gpu
import pytest


def _dry_run(capsys, models: list[str], *extra: str) -> str:
    argv = ["--cpu", "--no-lesion", "--slices", "2", "--repeats", "1", "--models", *models]
    assert bench_gpu.main([*argv, *extra]) == 0
    return capsys.readouterr().out


def _check(out: str, name: str) -> None:
    for precision in ("fp32", "half"):
        assert re.search(rf"{name}\s+{precision} encoder .* click .* 2 slices", out), out
    dice = re.search(rf"{name}\s+half vs fp32 masks: Dice ([0-9.]+) \(2 slices\)", out)
    assert dice and 0.0 <= float(dice.group(1)) <= 1.0, out


def test_bench_gpu_dry_run_fused_tiny(capsys):
    """The fused ViT-B path (tiny configuration): encoder against the reference, click,
    the slice sweep, --half, and the Dice between precisions, printed."""
    _check(_dry_run(capsys, ["fused ViT-B"], "--tiny"), "fused ViT-B")


@pytest.mark.slow
def test_bench_gpu_dry_run_litemedsam(capsys):
    """The LiteMedSAM path on its real weights (the 40-slice lesion left out)."""
    _check(_dry_run(capsys, ["litemedsam"]), "litemedsam")
