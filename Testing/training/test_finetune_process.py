"""Fine-tuning as a watched subprocess: real runs of a micro model on phantom slices."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

from RobustMedSAMLib.model.config import TINY
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.training.config import TrainingConfig
from RobustMedSAMLib.training.process import FinetuneProcess, describe, parse_line, progress_of
from RobustMedSAMLib.weights.checkpoint import load_model, save_state_dict

MICRO = dataclasses.replace(
    TINY, image_size=128, window_size=4, encoder_depth=2, encoder_global_attn_indexes=(1,)
)
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("micro") / "micro.safetensors"
    return save_state_dict(SegmentAnythingModel(MICRO, robust=True).state_dict(), path, MICRO)


def write_config(path: Path, checkpoint: Path, **train) -> Path:
    values = {
        "model": {"checkpoint": str(checkpoint)},
        "train": {"steps": 6, "batch_size": 2, "lr": 0.001, "val_every": 3, **train},
        "data": {"phantom_volumes": 2, "phantom_shape": [6, 48, 48], "val_samples": 4},
        "corruption": {"variants": 1},
        "prompts": {"corrections": 0, "box_probability": 1.0},
    }
    path.write_text(TrainingConfig.from_dict(values).to_toml(), encoding="utf-8")
    return path


def run_until(process: FinetuneProcess, until=None, limit: float = 60.0) -> list[dict]:
    """Poll as a GUI timer would; call ``until(event)`` on each event."""
    events: list[dict] = []
    deadline = time.monotonic() + limit
    while process.running and time.monotonic() < deadline:
        for event in process.poll():
            events.append(event)
            if until is not None:
                until(event)
        time.sleep(0.05)
    events += process.poll()
    assert not process.running, "the fine-tuning process did not finish in time"
    return events


def test_run_streams_events_in_order_and_gives_a_loadable_model(tmp_path, micro_checkpoint):
    config = write_config(tmp_path / "config.toml", micro_checkpoint)
    process = FinetuneProcess(config, tmp_path / "run", env=ENV)
    assert process.model_path() is None and not process.running
    process.start()
    assert process.running
    events = run_until(process)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-2:] == ["done", "exited"]
    assert kinds.index("cache") < kinds.index("val") < kinds.index("step")
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [progress_of(e) for e in events if e["event"] == "step"][-1] == (6, 6)
    assert events[-1] == {"event": "exited", "returncode": 0, "error": None}
    assert process.returncode == 0 and process.last_error is None
    model_file = process.model_path()
    assert model_file == tmp_path / "run" / "last.safetensors"
    assert process.model_path(best=True) == tmp_path / "run" / "best.safetensors"
    assert load_model(model_file).config == MICRO


def test_stop_midway_saves_a_resumable_run_and_kill_ends_it(tmp_path, micro_checkpoint):
    config = write_config(tmp_path / "config.toml", micro_checkpoint, steps=400, val_every=1000)
    run_dir = tmp_path / "run"
    process = FinetuneProcess(config, run_dir, env=ENV)
    process.start()

    def stop_at_step_two(event):
        if event["event"] == "step" and event["step"] == 2:
            process.stop(timeout=30)

    events = run_until(process, stop_at_step_two)
    assert [e["event"] for e in events][-2:] == ["stopped", "exited"]
    stopped_at = events[-2]["step"]
    assert 2 <= stopped_at < 400 and process.returncode == 0
    assert process.model_path() is None  # stopped, not finished
    assert (run_dir / "state.pt").is_file()

    resumed = FinetuneProcess(config, run_dir, resume=True, env=ENV)
    resumed.start()
    first_step = []

    def kill_after_first_step(event):
        if event["event"] == "start":
            first_step.append(event["step"])
        if event["event"] == "step":
            resumed.kill()

    events = run_until(resumed, kill_after_first_step)
    assert first_step == [stopped_at]  # continued where the stopped run saved
    assert events[-1]["event"] == "exited" and events[-1]["returncode"] != 0
    assert resumed.last_error and resumed.model_path() is None
    assert (run_dir / "state.pt").is_file()  # the last save survives the kill


def test_bad_config_fails_with_the_clis_one_line_error(tmp_path, micro_checkpoint):
    config = tmp_path / "bad.toml"
    config.write_text(f'[model]\ncheckpoint = "{micro_checkpoint}"\n[train]\nsteps_ = 3\n')
    process = FinetuneProcess(config, tmp_path / "run", env=ENV)
    process.start()
    with pytest.raises(RuntimeError, match="already started"):
        process.start()
    events = run_until(process)
    assert process.returncode == 2
    assert process.last_error.startswith("robustmedsam finetune: error: unknown key(s) ['steps_']")
    assert events[-1] == {"event": "exited", "returncode": 2, "error": process.last_error}
    assert not (tmp_path / "run").exists()


def test_missing_interpreter_is_refused_at_start(tmp_path):
    process = FinetuneProcess(tmp_path / "c.toml", tmp_path / "run", python="/no/such/python")
    with pytest.raises(FileNotFoundError):
        process.start()
    assert not process.running


def test_lines_progress_and_status_text():
    assert parse_line('{"event": "step", "step": 3, "total_steps": 10}')["step"] == 3
    assert parse_line("Traceback (most recent call last):") == {
        "event": "log",
        "line": "Traceback (most recent call last):",
    }
    assert parse_line("[1, 2]")["event"] == "log"
    assert progress_of({"event": "cache", "split": "train", "done": 4, "total": 8}) == (4, 8)
    assert progress_of({"event": "start", "step": 5, "total_steps": 10}) == (5, 10)
    assert progress_of({"event": "val", "step": 5}) is None
    assert progress_of({"event": "step"}) is None
    step = {"event": "step", "step": 12, "total_steps": 200, "loss": 0.4312, "eta_s": 190.0}
    assert describe(step) == "Step 12/200, loss 0.431, 3 min left"
    assert "resume" in describe({"event": "stopped", "step": 7})
