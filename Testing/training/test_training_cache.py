"""The embedding cache: fp16 encoder outputs per image and variant, reused by key."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.model.config import TINY
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.training.embedding_cache import build_cache, encoder_digest

MICRO = dataclasses.replace(
    TINY, image_size=128, window_size=4, encoder_depth=2, encoder_global_attn_indexes=(1,)
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SegmentAnythingModel(MICRO, robust=True)


def _encoder(model):
    def encode(images: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding, early = model.image_encoder.forward_with_early(images)
        return {"embedding": embedding, "early": early}

    return encode


def _inputs(index: int, variant: int) -> torch.Tensor:
    return torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(10 * index + variant))


def test_cache_holds_the_encoder_outputs_of_every_variant(tmp_path, model):
    cache = build_cache(tmp_path, "k1", _encoder(model), 3, 2, _inputs, batch_size=2)
    got = cache.get([2, 0], [1, 2])
    embedding, early = got["embedding"], got["early"]
    with torch.no_grad():
        want = [model.image_encoder.forward_with_early(_inputs(i, v)) for i, v in ((2, 1), (0, 2))]
    torch.testing.assert_close(embedding, torch.cat([w[0] for w in want]), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(early, torch.cat([w[1] for w in want]), atol=2e-2, rtol=1e-2)
    assert embedding.dtype == torch.float32 and cache.nbytes == 3 * 3 * 2 * (64 * 64) * 2
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".k"))
    assert names == [
        *(f"{k}_v{v}.npy" for k in ("early", "embedding") for v in range(3)),
        "manifest.json",
    ]


def test_cache_is_reused_for_its_key_and_refused_for_another(tmp_path, model):
    build_cache(tmp_path, "k1", _encoder(model), 2, 1, model_input=_inputs)

    def fail(index: int, variant: int) -> torch.Tensor:
        raise AssertionError("the encoder ran again")

    build_cache(tmp_path, "k1", _encoder(model), 2, 1, model_input=fail)
    with pytest.raises(InputError, match="other data or weights"):
        build_cache(tmp_path, "k2", _encoder(model), 2, 1, model_input=fail)


def test_encoder_digest_changes_with_the_weights(model):
    before = encoder_digest(model.image_encoder)
    other = SegmentAnythingModel(MICRO, robust=True)
    assert encoder_digest(model.image_encoder) == before != encoder_digest(other.image_encoder)


@pytest.mark.parametrize(
    "damage, words",
    [
        ("manifest", "damaged"),
        ("kinds", "damaged"),
        ("rows", "damaged"),
        ("dtype", "damaged"),
        ("object array", "damaged"),
    ],
)
def test_a_damaged_cache_is_refused_and_left_alone(tmp_path, model, damage, words):
    import json

    import numpy as np

    build_cache(tmp_path, "k1", _encoder(model), 2, 1, model_input=_inputs)
    manifest = tmp_path / "manifest.json"
    values = json.loads(manifest.read_text())
    if damage == "manifest":
        values["variants"] = "many"
    elif damage == "kinds":
        values["kinds"] = ["../../etc/x"]
    elif damage == "rows":
        np.save(tmp_path / "early_v1.npy", np.zeros((1, 4), np.float16))
    elif damage == "dtype":
        np.save(tmp_path / "early_v1.npy", np.zeros((2, 4), np.float32))
    elif damage == "object array":
        np.save(tmp_path / "early_v1.npy", np.array([{"a": 1}, None]), allow_pickle=True)
    manifest.write_text(json.dumps(values))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(InputError, match=words):
        build_cache(tmp_path, "k1", _encoder(model), 2, 1, model_input=_inputs)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_cache_folder_that_is_a_file_is_refused(tmp_path, model):
    (tmp_path / "cache").write_text("mine")
    with pytest.raises(InputError, match="cannot make the embedding cache"):
        build_cache(tmp_path / "cache" / "train-k1", "k1", _encoder(model), 2, 1, _inputs)
