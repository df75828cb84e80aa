"""Strict checkpoint loading: real key layouts load; every fault is one clear error."""

from __future__ import annotations

import argparse
import io
import pickle
import random

import pytest
import torch
from reference_models import reference_robust_sam

from RobustMedSAMLib.errors import CheckpointError
from RobustMedSAMLib.model.config import TINY, VIT_B
from RobustMedSAMLib.weights.checkpoint import (
    fuse_state_dicts,
    infer_config,
    load_model,
    read_state_dict,
    save_state_dict,
)


def test_infer_config_recovers_tiny_and_vit_b(tiny_robust_state):
    assert infer_config(tiny_robust_state) == TINY
    from reference_models import random_state_dict

    # Shapes only matter: a ViT-B state built from meta tensors would do, but a real one is cheap
    vit_b = {k: torch.empty(v.shape) for k, v in random_state_dict(VIT_B, False).items()}
    assert infer_config(vit_b) == VIT_B


@pytest.mark.parametrize("name", ["robust", "robust_safetensors"])
def test_robust_checkpoint_loads_with_or_without_module_prefix(
    tiny_checkpoints, tiny_robust_state, name
):
    model = load_model(tiny_checkpoints[name])
    assert model.robust and model.config == TINY
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, tiny_robust_state[key])


def test_sam_layout_loads_as_plain_model(tiny_checkpoints):
    model = load_model(tiny_checkpoints["sam"])
    assert not model.robust


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pth")


def test_truncated_file(tmp_path, tiny_checkpoints):
    data = tiny_checkpoints["sam"].read_bytes()
    broken = tmp_path / "truncated.pth"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(broken)


def test_pickled_python_objects_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"x": Payload()}, handle)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path)


def test_pickled_objects_are_named_without_torchs_advice_to_load_unsafely(tmp_path):
    path = tmp_path / "objects.pth"
    torch.save({"a": torch.zeros(1), "b": argparse.Namespace(x=1)}, path)
    with pytest.raises(CheckpointError) as refused:
        read_state_dict(path)
    assert "GLOBAL argparse.Namespace" in str(refused.value)
    assert "False" not in str(refused.value) and "\x1b" not in str(refused.value)


@pytest.mark.parametrize("data", [b'{"markups": []}', b"NRRD0004\n# Complete NRRD"])
def test_a_file_that_is_no_checkpoint(tmp_path, data):
    # an NRRD header once made torch's unpickler raise IndexError: a traceback
    path = tmp_path / "wrong.pth"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_state_dict(path)


@pytest.mark.parametrize("zipped", [True, False])
def test_damaged_checkpoints_are_refused_or_read(tmp_path, zipped):
    # before: IndexError, KeyError, struct.error, AssertionError, BadZipFile escaped
    buffer = io.BytesIO()
    torch.save({"a": torch.zeros(3), "b": torch.ones(2)}, buffer,
               _use_new_zipfile_serialization=zipped)  # fmt: skip
    good, rng, path = buffer.getvalue(), random.Random(1), tmp_path / "damaged.pth"
    for n in range(300):
        data = bytearray(good)
        for _ in range(3):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data[: rng.randrange(1, len(data))] if n % 3 == 0 else data))
        try:
            read_state_dict(path)
        except CheckpointError:
            pass


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="not a model state dict"):
        read_state_dict(path)


def test_missing_key_is_named(tmp_path, tiny_sam_state):
    state = dict(tiny_sam_state)
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"1 missing keys \(mask_decoder.iou_token.weight\)"):
        load_model(tmp_path / "m.pth")


def test_unexpected_key_is_named(tmp_path, tiny_sam_state):
    state = dict(tiny_sam_state, **{"mask_decoder.extra.weight": torch.zeros(3)})
    torch.save(state, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="unexpected keys .*mask_decoder.extra.weight"):
        load_model(tmp_path / "m.pth")


def test_wrong_shape_is_named(tmp_path, tiny_sam_state):
    state = dict(tiny_sam_state)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 7)
    torch.save(state, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"wrong shapes .*iou_token.weight \(1, 7\)"):
        load_model(tmp_path / "m.pth")


def test_sam_file_given_as_robust_decoder(tiny_checkpoints):
    with pytest.raises(CheckpointError, match="expected RobustSAM.*SAM-layout checkpoint"):
        load_model(tiny_checkpoints["sam"], robust=True)


def test_robust_file_given_as_sam(tiny_checkpoints):
    with pytest.raises(CheckpointError, match="expected a SAM-layout.*RobustSAM-layout"):
        load_model(tiny_checkpoints["robust"], robust=False)


def test_fuse_takes_encoder_from_one_and_decoder_from_other(tiny_sam_state, tiny_robust_state):
    fused = fuse_state_dicts(tiny_sam_state, tiny_robust_state)
    for key, value in fused.items():
        source = tiny_sam_state if key.startswith("image_encoder.") else tiny_robust_state
        assert torch.equal(value, source[key]), key
    assert set(fused) == set(tiny_robust_state)


def test_fused_checkpoint_loads_in_reference_builder(tmp_path, tiny_sam_state, tiny_robust_state):
    """The fused file is in RobustSAM's own key layout: the reference loads it strictly."""
    path = save_state_dict(fuse_state_dicts(tiny_sam_state, tiny_robust_state), tmp_path / "f.pth")
    state = torch.load(path, weights_only=True)
    reference_robust_sam(TINY, state)  # strict=True inside
    assert load_model(path).robust


def test_fuse_refuses_decoder_without_robust_modules(tiny_sam_state):
    with pytest.raises(CheckpointError, match="expected RobustSAM"):
        fuse_state_dicts(tiny_sam_state, tiny_sam_state, "medsam.pth", "sam.pth")


def test_fuse_refuses_encoder_without_encoder(tiny_robust_state):
    decoder_only = {k: v for k, v in tiny_robust_state.items() if k.startswith("mask_decoder")}
    with pytest.raises(CheckpointError, match="no SAM-family image encoder"):
        fuse_state_dicts(decoder_only, tiny_robust_state, "dec.pth", "robust.pth")


def test_save_is_atomic_and_safetensors_keeps_config(tmp_path, tiny_robust_state):
    path = save_state_dict(tiny_robust_state, tmp_path / "m.safetensors", config=TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        assert "robustmedsam.config" in handle.metadata()
