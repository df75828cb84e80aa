"""The evaluation's shared encoder cache: models with the same encoder weights encode a
model input once, and every number stays what the uncached model gives."""

from __future__ import annotations

import copy
import csv

import pytest
import torch

from RobustMedSAMLib.cli import main
from RobustMedSAMLib.evaluation.encoder_cache import attach_encoder_cache
from RobustMedSAMLib.inference import engines
from RobustMedSAMLib.model.config import LITE_MEDSAM, TINY
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.model.tiny_vit import TinyViTEncoder


def _model(state: dict, robust: bool) -> SegmentAnythingModel:
    model = SegmentAnythingModel(TINY, robust=robust)
    model.load_state_dict(state, strict=True)
    return model


def _image(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, TINY.image_size, TINY.image_size, generator=generator)


def _other_decoder(state: dict) -> dict:
    """The same encoder, a different robust decoder (as litemedsam vs robustmedsam-lite)."""
    other = dict(state)
    prefix = "mask_decoder.fourier_first_layer_features"
    key = next(k for k in other if k.startswith(prefix) and k.endswith("bias"))
    other[key] = other[key] + 1.0
    return other


def _forward_with_early_calls(encoder) -> list[int]:
    calls, inner = [0], encoder.forward_with_early

    def counted(images):
        calls[0] += 1
        return inner(images)

    encoder.forward_with_early = counted
    return calls


@torch.no_grad()
def test_a_second_model_with_the_same_encoder_runs_no_encoder(tmp_path, tiny_robust_state):
    first_state, second_state = tiny_robust_state, _other_decoder(tiny_robust_state)
    image = _image(0)
    want = [_model(s, True).encode(image) for s in (first_state, second_state)]
    assert not torch.equal(want[0].robust, want[1].robust)  # the decoders' parts differ

    first, second = _model(first_state, True), _model(second_state, True)
    cached = [attach_encoder_cache(m, tmp_path) for m in (first, second)]
    calls = [_forward_with_early_calls(c.encoder) for c in cached]
    got = [first.encode(image), second.encode(image)]

    assert calls == [[1], [0]]
    assert (cached[0].misses, cached[1].hits) == (1, 1)
    for have, expected in zip(got, want, strict=True):
        assert torch.equal(have.embedding, expected.embedding)
        assert torch.equal(have.robust, expected.robust)  # early features stored exactly


@torch.no_grad()
def test_other_weights_or_input_are_computed(tmp_path, tiny_robust_state):
    model = _model(tiny_robust_state, True)
    cached = attach_encoder_cache(model, tmp_path)
    model.encode(_image(0))
    model.encode(_image(1))  # another input: a miss
    other_encoder = copy.deepcopy(tiny_robust_state)
    key = next(k for k in other_encoder if k.startswith("image_encoder.") and "bias" in k)
    other_encoder[key] = other_encoder[key] + 0.5
    other = _model(other_encoder, True)
    other_cached = attach_encoder_cache(other, tmp_path)
    features = other.encode(_image(0))  # same input, other weights: a miss
    assert (cached.misses, cached.hits, other_cached.misses) == (2, 0, 1)
    assert torch.equal(features.embedding, _model(other_encoder, True).encode(_image(0)).embedding)


@torch.no_grad()
def test_a_damaged_entry_is_recomputed(tmp_path, tiny_sam_state):
    """A plain (non-robust) model, and a cut-off file: read fails, recomputed, rewritten."""
    model = _model(tiny_sam_state, False)
    cached = attach_encoder_cache(model, tmp_path)
    calls = _forward_with_early_calls(cached.encoder)
    want = model.encode(_image(0)).embedding
    (entry,) = tmp_path.rglob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])
    again = model.encode(_image(0)).embedding
    assert calls == [2] and cached.misses == 2 and torch.equal(again, want)
    assert torch.equal(model.encode(_image(0)).embedding, want) and cached.hits == 1


RUN = [
    "--data", "phantom:sphere,size=24", "--corruptions", "clean", "--seeds", "0", "1",
    "--prompt", "box", "--projection", "mask", "--clicks", "1", "--device", "cpu",
    "--no-progress", "--prompt-jitter", "0.1",
]  # fmt: skip


def _rows(path, model: str) -> dict[tuple, str]:
    """One model's rows: key columns (but the model) -> value."""
    with open(path, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["model"] == model]
    return {tuple(v for k, v in r.items() if k not in ("model", "value")): r["value"] for r in rows}


def test_evaluate_with_the_cache_gives_the_same_numbers(tmp_path, tiny_checkpoints):
    robust = str(tiny_checkpoints["robust"])
    plain, cache = tmp_path / "plain", tmp_path / "cache"
    assert main(["evaluate", "--model", f"a=robustsam:{robust}", "--out", str(plain), *RUN]) == 0
    shared = ["--encoder-cache", str(cache)]
    first = ["--model", f"a=robustsam:{robust}"]
    assert main(["evaluate", *first, "--out", str(tmp_path / "one"), *RUN, *shared]) == 0
    entries = len(list(cache.rglob("*.safetensors")))
    both = [*first, "--model", f"b=robustsam:{robust}"]
    assert main(["evaluate", *both, "--out", str(tmp_path / "two"), *RUN, *shared]) == 0
    assert len(list(cache.rglob("*.safetensors"))) == entries > 0  # b: all hits
    want = _rows(plain / "results.csv", "a")
    assert len(want) > 0 and _rows(tmp_path / "one/results.csv", "a") == want
    assert _rows(tmp_path / "two/results.csv", "a") == want
    assert _rows(tmp_path / "two/results.csv", "b") == want


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
@torch.no_grad()
def test_a_runtime_engine_stores_both_outputs_under_its_own_key(engine, tmp_path, monkeypatch):
    """Misses of a lite encoder run on the runtime; embedding and early features match
    eager within the engines' bound (test_engines.py: 1e-4 of the largest value), and
    an eager model does not take the runtime's entries for its own."""
    pytest.importorskip({"onnx": "onnxruntime", "openvino": "openvino"}[engine])
    pytest.importorskip("onnx")
    monkeypatch.setattr(engines, "cache_dir", lambda: tmp_path / "user")
    fast, eager = _small_lite_model(), _small_lite_model()
    image = _image(0)
    want_embedding, want_early = eager.image_encoder.forward_with_early(image)
    cached = attach_encoder_cache(fast, tmp_path / "cache", engine)
    calls = _forward_with_early_calls(cached.encoder)
    embedding, early = fast.image_encoder.forward_with_early(image)
    assert calls == [0] and cached.misses == 1  # the runtime encoded, not eager torch
    for got, want in ((embedding, want_embedding), (early, want_early)):
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    again = fast.image_encoder.forward_with_early(image)
    assert cached.hits == 1 and torch.equal(again[0], embedding) and torch.equal(again[1], early)
    plain = attach_encoder_cache(eager, tmp_path / "cache")
    eager.image_encoder(image)
    assert plain.misses == 1 and len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2


def _small_lite_model() -> SegmentAnythingModel:
    """LiteMedSAM's architecture with a narrow, shallow TinyViT (exports in a second)."""
    torch.manual_seed(0)
    model = SegmentAnythingModel(LITE_MEDSAM, robust=False)
    model.image_encoder = TinyViTEncoder(
        embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)
    )
    return model.eval()
