"""Training configs: TOML round trip, clear errors, shipped example configs parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.training.config import TrainingConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_toml_round_trip_keeps_every_value(tmp_path):
    config = TrainingConfig.from_dict(
        {
            "model": {"init": "random", "size": "tiny"},
            "train": {"mode": "full", "steps": 7, "lr": 3e-4},
            "corruption": {"names": ["gaussian_noise"], "severities": [2, 4]},
            "data": {"phantom_shape": [8, 32, 32]},
        }
    )
    path = tmp_path / "config.toml"
    path.write_text(config.to_toml())
    assert TrainingConfig.from_toml(path) == config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"trian": {}}, r"unknown config section\(s\) \['trian'\]"),
        ({"train": {"stpes": 3}}, r"unknown key\(s\) \['stpes'\] in \[train\]"),
        ({"train": {"mode": "lora"}}, "train.mode = 'lora' is not one of"),
        ({"train": {"steps": "many"}}, "train.steps must be a whole number"),
        ({"model": {"init": "checkpoint"}}, "needs checkpoint"),
        ({"corruption": {"names": ["fog"]}}, r"unknown corruption\(s\) \['fog'\]"),
        ({"data": {"source": "medsegbench"}}, "needs paths"),
    ],
)
def test_bad_configs_name_the_key(values, message):
    values.setdefault("model", {"init": "random"})
    with pytest.raises(InputError, match=message):
        TrainingConfig.from_dict(values)


def test_unreadable_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = ")
    with pytest.raises(InputError, match="not a valid TOML"):
        TrainingConfig.from_toml(bad)
    with pytest.raises(InputError, match="not found"):
        TrainingConfig.from_toml(tmp_path / "missing.toml")


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[model]\ncheckpoint = "weights/fused.pth"\n[data]\nsource = "volumes"\nfolder = "data"\n'
    )
    config = TrainingConfig.from_toml(path)
    assert config.model.checkpoint == str(tmp_path / "weights" / "fused.pth")
    assert config.data.folder == str(tmp_path / "data")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_example_configs_parse(path):
    config = TrainingConfig.from_toml(path)
    assert config.train.steps > 0
