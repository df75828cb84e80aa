"""The lite encoder and mask decoder under ONNX Runtime / OpenVINO give eager PyTorch's
masks; a missing runtime falls back to eager with one line; the exports are cached by the
weights' digest.

Tolerance: the runtimes compute the same float32 graphs, summing in another order (and
fusing layers). Each of the encoder's ~20 layers (the decoder's ~10) adds a rounding error
of a few float32 ulps relative to its output scale; 1e-4 of the output's largest value
(about 800 ulps) bounds the accumulation with margin, yet is far below a real change (a
weight altered by 1 % moves the output by ~1e-2). Through encoder and decoder together
the logits may differ by the encoder's error propagated: 1e-3 of the largest logit; a
mask may differ only where the eager logit is within that of 0.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.inference import engines
from RobustMedSAMLib.inference.engines import (
    RuntimeDecoder,
    RuntimeRobustDecoder,
    cached_onnx,
    use_engine,
)
from RobustMedSAMLib.inference.predictor import Predictor
from RobustMedSAMLib.inference.types import SlicePrompt
from RobustMedSAMLib.model.config import LITE_MEDSAM, LITE_ROBUST, TINY
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.model.tiny_vit import TinyViTEncoder

RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino"}


def small_lite_model(seed: int = 0) -> SegmentAnythingModel:
    """LiteMedSAM's architecture (256 x 256 in, 64 x 64 x 256 embedding) with a narrow,
    shallow TinyViT so that exporting it takes a second; random weights."""
    torch.manual_seed(seed)
    model = SegmentAnythingModel(LITE_MEDSAM, robust=False)
    model.image_encoder = TinyViTEncoder(
        embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)
    )
    return model.eval()


def slice_image() -> np.ndarray:
    """A 200 x 240 slice: a bright ellipse on a ramp (rows, cols)."""
    rows, cols = np.mgrid[:200, :240]
    image = 100.0 + 0.3 * cols
    image[((rows - 90) / 40.0) ** 2 + ((cols - 130) / 55.0) ** 2 < 1] += 400.0
    return image


def assert_same_decoding(eager: SegmentAnythingModel, fast: SegmentAnythingModel):
    """Both models decode the eager encoder's features of one slice: boxes, points
    (another number of prompt tokens), three candidates or one, a fed-back mask; the
    logits agree within 1e-4 of the largest. Returns the predictors and the eager box
    prediction."""
    predictors = [Predictor(m, preprocessing="litemedsam") for m in (eager, fast)]
    predictors[0].set_image(slice_image(), window=(0.0, 600.0))
    predictors[1].current = predictors[0].current
    box = SlicePrompt(box=np.array([70.0, 45.0, 190.0, 135.0]))
    first = predictors[0].predict(box)
    prompts = [
        box,
        SlicePrompt(points=[[130.0, 90.0]], labels=[1]),  # one point: three candidates
        SlicePrompt(points=[[130.0, 90.0], [20.0, 20.0], [200, 170]], labels=[1, 0, 0]),
        SlicePrompt(box=box.box, mask_input=first.low_res_logits),
    ]
    for prompt in prompts:
        want, got = (p.predict(prompt) for p in predictors)
        scale = np.abs(want.low_res_logits).max()
        assert np.abs(got.low_res_logits - want.low_res_logits).max() <= 1e-4 * scale
        assert abs(got.score - want.score) <= 1e-4
        assert (got.mask != want.mask).sum() <= max(1, int(0.001 * want.mask.size))
    return predictors, box, first


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "cache_dir", lambda: tmp_path)
    return tmp_path / "engines"


@pytest.mark.parametrize("engine", sorted(RUNTIMES))
def test_an_engine_gives_the_eager_masks(engine, cache):
    pytest.importorskip(RUNTIMES[engine])
    pytest.importorskip("onnx")
    eager = small_lite_model()
    fast = small_lite_model()
    assert use_engine(fast, engine, threads=1) == engine
    assert not isinstance(fast.image_encoder, TinyViTEncoder)  # the runtime encodes
    assert isinstance(fast.mask_decoder, RuntimeDecoder)  # and decodes
    image, box = slice_image(), np.array([70.0, 45.0, 190.0, 135.0])
    results = []
    for model in (eager, fast):
        predictor = Predictor(model, preprocessing="litemedsam")
        predictor.set_image(image, window=(0.0, 600.0))
        prediction = predictor.predict(SlicePrompt(box=box))
        results.append((predictor.current.features.embedding, prediction))
    (e_embedding, e_mask), (f_embedding, f_mask) = results
    scale = float(e_embedding.abs().max())
    assert float((f_embedding - e_embedding).abs().max()) <= 1e-4 * scale
    logits = e_mask.low_res_logits
    assert np.abs(f_mask.low_res_logits - logits).max() <= 1e-3 * np.abs(logits).max()
    assert e_mask.mask.any() and not e_mask.mask.all()  # a real mask, not a trivial one
    differ = e_mask.mask != f_mask.mask
    assert differ.sum() <= max(1, int(0.001 * differ.size))


@pytest.mark.parametrize("engine", sorted(RUNTIMES))
def test_the_engine_decoder_gives_the_eager_logits_for_every_prompt(engine, cache):
    """Same embedding, so only the decoder differs: boxes, points (another number of
    prompt tokens), a fed-back mask, three candidates or one."""
    pytest.importorskip(RUNTIMES[engine])
    pytest.importorskip("onnx")
    eager, fast = small_lite_model(), small_lite_model()
    use_engine(fast, engine, threads=1)
    assert_same_decoding(eager, fast)


def test_a_missing_runtime_falls_back_to_eager_with_one_line(cache, monkeypatch, caplog):
    monkeypatch.setattr(engines, "_importable", lambda name: name != "openvino")
    model = small_lite_model()
    encoder, decoder = model.image_encoder, model.mask_decoder
    with caplog.at_level(logging.WARNING):
        assert use_engine(model, "openvino") == "eager"
    assert model.image_encoder is encoder and model.mask_decoder is decoder
    (record,) = caplog.records
    assert "openvino" in record.getMessage() and "robustmedsam[cpu-engines]" in record.getMessage()
    assert not cache.exists()  # nothing exported


def test_the_export_is_cached_by_the_weights(cache, monkeypatch):
    pytest.importorskip("onnx")
    first = cached_onnx(small_lite_model(0).image_encoder, 256)
    stamp = first.stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    assert cached_onnx(small_lite_model(0).image_encoder, 256) == first
    assert first.stat().st_mtime_ns == stamp
    with pytest.raises(AssertionError, match="exported again"):  # other weights, new export
        cached_onnx(small_lite_model(1).image_encoder, 256)


def test_engines_refuse_what_they_cannot_run():
    with pytest.raises(InputError, match="unknown engine"):
        use_engine(small_lite_model(), "tensorrt")
    vit = SegmentAnythingModel(TINY, robust=False)
    with pytest.raises(InputError, match="--engine eager"):
        use_engine(vit, "onnx")
    assert use_engine(vit, "eager") == "eager"


def test_the_dense_positional_encoding_is_cached_until_its_weights_change():
    model = small_lite_model()
    with torch.inference_mode():
        first = model.dense_pe()
        assert model.dense_pe() is first  # computed once per slice's clicks, not per click
        torch.testing.assert_close(first, model.prompt_encoder.get_dense_pe(), rtol=0, atol=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] *= 2.0
    model.load_state_dict(state)  # e.g. a checkpoint loaded after a first click
    with torch.inference_mode():
        torch.testing.assert_close(model.dense_pe(), model.prompt_encoder.get_dense_pe())
        assert not torch.equal(model.dense_pe(), first)
    model.train()
    assert model.dense_pe() is not first  # training: every call


def small_robust_lite_model(seed: int = 0) -> SegmentAnythingModel:
    """robustmedsam-lite's architecture (the robust decoder, TinyViT's 160-channel early
    features) with a narrow, shallow TinyViT; random weights, every robust branch live."""
    torch.manual_seed(seed)
    model = SegmentAnythingModel(LITE_ROBUST, robust=True)
    model.image_encoder = TinyViTEncoder(
        embed_dims=(8, 16, 160, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)
    )
    return model.eval()


@pytest.mark.parametrize("engine", sorted(RUNTIMES))
def test_an_engine_encodes_for_the_robust_lite_decoder(engine, cache):
    """robustmedsam-lite (the default model): the runtime's encoder gives the embedding and
    the early features its robust decoder reads; masks as eager.
    Before: ``--engine`` refused robust models."""
    pytest.importorskip(RUNTIMES[engine])
    pytest.importorskip("onnx")
    eager, fast = small_robust_lite_model(), small_robust_lite_model()
    assert use_engine(fast, engine, threads=1) == engine
    assert not isinstance(fast.image_encoder, TinyViTEncoder)
    image, box = slice_image(), np.array([70.0, 45.0, 190.0, 135.0])
    results = []
    for model in (eager, fast):
        predictor = Predictor(model, preprocessing="litemedsam")
        predictor.set_image(image, window=(0.0, 600.0))
        results.append((predictor.current.features, predictor.predict(SlicePrompt(box=box))))
    (e_features, e_mask), (f_features, f_mask) = results
    for name in ("embedding", "robust"):
        want, got = getattr(e_features, name), getattr(f_features, name)
        assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    logits = e_mask.low_res_logits
    assert np.abs(f_mask.low_res_logits - logits).max() <= 1e-3 * np.abs(logits).max()
    differ = e_mask.mask != f_mask.mask
    assert differ.sum() <= max(1, int(0.001 * differ.size))


@pytest.mark.parametrize("engine", sorted(RUNTIMES))
def test_the_robust_lite_decoder_runs_on_the_engine_with_the_eager_logits(engine, cache):
    """robustmedsam-lite's click on the runtime (issue #22): same features, so only the
    decoder differs; boxes and points (the slice's cached layer-0 projections), another
    number of prompt tokens, three candidates or one, and a fed-back mask (which changes
    layer 0: the other graph). Before: the robust decoder stayed eager."""
    pytest.importorskip(RUNTIMES[engine])
    pytest.importorskip("onnx")
    eager, fast = small_robust_lite_model(), small_robust_lite_model()
    use_engine(fast, engine, threads=1)
    assert isinstance(fast.mask_decoder, RuntimeRobustDecoder)
    predictors, box, first = assert_same_decoding(eager, fast)
    # the runtime encoder's features feed the runtime decoder too: a fresh slice
    predictors[1].set_image(slice_image(), window=(0.0, 600.0))
    assert len(predictors[1].current.features.first_layer) == 3
    got = predictors[1].predict(box)
    assert (got.mask != first.mask).sum() <= max(1, int(0.001 * first.mask.size))
