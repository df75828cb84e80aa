"""Fine-tuning runs end to end on a micro model and phantom slices (CPU, seconds)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.model.config import TINY
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.training.config import TrainingConfig
from RobustMedSAMLib.training.runner import RunOptions, train
from RobustMedSAMLib.weights.checkpoint import load_model, read_state_dict, save_state_dict

MICRO = dataclasses.replace(
    TINY, image_size=128, window_size=4, encoder_depth=2, encoder_global_attn_indexes=(1,)
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other work for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised robust micro model (8x8 embedding grid, 32x32 masks)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("micro") / "micro.safetensors"
    return save_state_dict(SegmentAnythingModel(MICRO, robust=True).state_dict(), path, MICRO)


def micro_config(checkpoint: Path, **sections) -> dict:
    values = {
        "model": {"checkpoint": str(checkpoint)},
        "train": {"mode": "decoder", "steps": 60, "batch_size": 4, "lr": 0.001},
        "data": {"phantom_volumes": 3, "phantom_shape": [10, 48, 48], "val_samples": 8},
        "corruption": {"variants": 2},
        "prompts": {"corrections": 1, "box_probability": 0.7},
    }
    for name, overrides in sections.items():
        values[name] = {**values.get(name, {}), **overrides}
    return values


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory, micro_checkpoint):
    run_dir = tmp_path_factory.mktemp("runs") / "decoder"
    records: list[dict] = []
    config = TrainingConfig.from_dict(
        micro_config(micro_checkpoint, train={"val_every": 10, "checkpoint_every": 1000})
    )
    result = train(config, run_dir, RunOptions(emit=records.append))
    return run_dir, records, result


def test_decoder_training_lowers_loss_and_raises_dice(decoder_run):
    _, records, result = decoder_run
    assert result.status == "done" and result.step == 60
    losses = result.losses
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.2
    dice = [r["val_dice"] for r in records if r["event"] == "val"]
    assert dice[0] < 0.25
    assert result.best_dice > dice[0] + 0.15
    points = [r["val_point_dice_clean"] for r in records if r["event"] == "val"]
    assert len(points) == len(dice) and points[-1] > points[0] + 0.1  # one click, too


def test_decoder_training_keeps_encoders_byte_identical(decoder_run, micro_checkpoint):
    run_dir, _, _ = decoder_run
    before, after = read_state_dict(micro_checkpoint), read_state_dict(run_dir / "last.safetensors")
    assert before.keys() == after.keys()
    frozen = [k for k in before if not k.startswith("mask_decoder.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    decoder = [k for k in before if k.startswith("mask_decoder.")]
    assert sum(not torch.equal(before[k], after[k]) for k in decoder) > len(decoder) // 2


def test_run_folder_holds_loadable_models_config_and_log(decoder_run):
    run_dir, records, _ = decoder_run
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.toml", "train.log", "state.pt", "last.safetensors", "best.safetensors"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary leftovers
    model = load_model(run_dir / "best.safetensors")
    assert model.robust and model.config == MICRO
    assert "validation at step 60" in (run_dir / "train.log").read_text()
    steps = [r for r in records if r["event"] == "step"]
    assert {"step", "epoch", "loss", "losses", "lr", "samples_per_s", "eta_s"} <= steps[0].keys()
    assert steps[-1]["eta_s"] == 0 and records[-1]["event"] == "done"


@pytest.mark.parametrize(
    ("mode", "blocks"), [("decoder", True), ("decoder", False), ("full", True)]
)
def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path, micro_checkpoint, mode, blocks):
    train_options = {"mode": mode, "steps": 8, "val_every": 100, "checkpoint_every": 100}
    values = micro_config(
        micro_checkpoint,
        train={**train_options, "robust_image_blocks": blocks},
        cache={"dir": str(tmp_path / "cache")},
    )
    config = TrainingConfig.from_dict(values)
    whole = train(config, tmp_path / "whole", RunOptions(emit=lambda r: None))
    first = train(config, tmp_path / "split", RunOptions(emit=lambda r: None, stop_after=3))
    assert first.status == "stopped" and first.step == 3
    second = train(config, tmp_path / "split", RunOptions(emit=lambda r: None, resume=True))
    assert second.status == "done"
    assert second.losses == whole.losses  # exactly: same batches, same arithmetic
    a = load_file(str(tmp_path / "whole" / "last.safetensors"))
    b = load_file(str(tmp_path / "split" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("multimask", [True, False])
def test_lone_point_runs_train_the_scores_that_pick_a_clicks_mask(
    tmp_path, micro_checkpoint, multimask
):
    """A lone click is decoded into three candidates and the best-scored one is shown:
    training on lone points must train those candidates' IoU scores (SAM's recipe);
    with ``multimask = false`` only the single-mask output is trained."""
    values = micro_config(
        micro_checkpoint,
        train={"steps": 4, "val_every": 100, "weight_decay": 0.0},
        prompts={"box_probability": 0.0, "corrections": 0, "multimask": multimask},
    )
    train(TrainingConfig.from_dict(values), tmp_path / "run", RunOptions(emit=lambda r: None))
    before = read_state_dict(micro_checkpoint)
    after = load_file(str(tmp_path / "run" / "last.safetensors"))
    head = "mask_decoder.iou_prediction_head.layers.2"
    for part in ("weight", "bias"):
        key = f"{head}.{part}"
        changed = [not torch.equal(before[key][row], after[key][row]) for row in range(4)]
        assert changed == [not multimask] + [multimask] * 3, key


def test_existing_run_folder_is_refused_and_left_alone(tmp_path, micro_checkpoint):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    config = TrainingConfig.from_dict(micro_config(micro_checkpoint))
    with pytest.raises(InputError, match="not empty; use --resume"):
        train(config, run_dir)
    assert [p.name for p in run_dir.iterdir()] == ["notes.txt"]


def test_resume_with_another_config_is_refused(tmp_path, micro_checkpoint):
    values = micro_config(micro_checkpoint, train={"steps": 2, "val_every": 100})
    train(TrainingConfig.from_dict(values), tmp_path / "run", RunOptions(emit=lambda r: None))
    values["train"]["lr"] = 0.5
    with pytest.raises(InputError, match="config differs"):
        train(TrainingConfig.from_dict(values), tmp_path / "run", RunOptions(resume=True))


def test_svd_run_writes_adapter_and_merged_model(tmp_path, micro_checkpoint):
    values = micro_config(
        micro_checkpoint,
        train={"mode": "svd", "steps": 3, "lr": 0.01, "val_every": 100},
        svd={"rank": 4},
    )
    train(TrainingConfig.from_dict(values), tmp_path / "run", RunOptions(emit=lambda r: None))
    adapter = load_file(str(tmp_path / "run" / "adapter_last.safetensors"))
    assert adapter and all(k.endswith(".svd_delta") and v.shape == (4,) for k, v in adapter.items())
    assert any(v.abs().max() > 0 for v in adapter.values())
    base, merged = (
        read_state_dict(micro_checkpoint),
        read_state_dict(tmp_path / "run" / "last.safetensors"),
    )
    assert base.keys() == merged.keys()
    changed = [
        k for k in base if k.startswith("image_encoder.") and not torch.equal(base[k], merged[k])
    ]
    assert changed and all(k.endswith(".weight") for k in changed)


def test_cli_streams_json_lines_stops_on_sigterm_and_resumes(tmp_path, micro_checkpoint):
    config_path = tmp_path / "config.toml"
    values = micro_config(micro_checkpoint, train={"steps": 200, "val_every": 1000})
    config_path.write_text(TrainingConfig.from_dict(values).to_toml())
    command = [sys.executable, "-m", "RobustMedSAMLib", "finetune", str(config_path)]
    command += ["--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    lines = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    ) as process:
        for line in process.stdout:
            lines.append(json.loads(line))
            if lines[-1]["event"] == "step" and lines[-1]["step"] == 2:
                process.send_signal(signal.SIGTERM)
    assert process.returncode == 0
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "stopped"
    stopped_at = lines[-1]["step"]
    assert 2 <= stopped_at < 200
    resumed = subprocess.run(
        [*command, "--resume", "--stop-after", str(stopped_at + 1)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in resumed.stdout.splitlines()]
    assert records[0]["step"] == stopped_at and records[-1]["event"] == "stopped"
    assert records[-1]["step"] == stopped_at + 1


def test_trained_model_segments_through_the_cli(tmp_path, decoder_run):
    from RobustMedSAMLib.cli import main
    from RobustMedSAMLib.datasets.phantoms import sphere
    from RobustMedSAMLib.formats.markups import write_points
    from RobustMedSAMLib.formats.volume import Volume, write_volume

    run_dir, _, _ = decoder_run
    phantom = sphere((8, 40, 40), radius=8.0)
    volume = Volume(phantom.image, phantom.ijk_to_ras, "ct")
    write_volume(volume, tmp_path / "ct.nrrd")
    centre = volume.ijk_to_ras_points(np.argwhere(phantom.mask).mean(axis=0)[::-1])
    write_points(tmp_path / "p.mrk.json", centre)
    out = tmp_path / "out.seg.nrrd"
    code = main(
        ["segment", str(tmp_path / "ct.nrrd"), "--points", str(tmp_path / "p.mrk.json"),
         "--out", str(out), "--model", "fused", "--checkpoint",
         str(run_dir / "best.safetensors"), "--device", "cpu"]
    )  # fmt: skip
    assert code == 0 and out.is_file()


def test_cpu_training_flushes_subnormal_floats(tmp_path, micro_checkpoint):
    """LiteMedSAM's activations reach subnormal floats, which made CPU training several
    times slower: the runner prepares the CPU as inference does."""
    from RobustMedSAMLib.training.runner import Trainer

    torch.set_flush_denormal(False)
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # subnormal in float32
    assert float(tiny * 1.0) != 0.0
    config = TrainingConfig.from_dict(micro_config(micro_checkpoint, train={"steps": 1}))
    Trainer(config, tmp_path / "run", RunOptions(emit=lambda record: None))
    assert float(tiny * 1.0) == 0.0
