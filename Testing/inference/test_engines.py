"""The lite encoder under ONNX Runtime / OpenVINO gives eager PyTorch's masks; a missing
runtime falls back to eager with one line; the export is cached by the weights' digest.

Tolerance: the runtimes compute the same float32 graph, summing in another order (and
fusing layers). Each of the encoder's ~20 layers adds a rounding error of a few float32
ulps relative to its output scale; 1e-4 of the embedding's largest value (about 800 ulps)
bounds the accumulation with margin, yet is far below a real change (a weight altered by
1 % moves the embedding by ~1e-2). A mask may then differ only where the eager logit is
within the logits' own propagated error of 0: 1e-3 of the largest logit.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.inference import engines
from RobustMedSAMLib.inference.engines import cached_onnx, use_engine
from RobustMedSAMLib.inference.predictor import Predictor
from RobustMedSAMLib.inference.types import SlicePrompt
from RobustMedSAMLib.model.config import LITE_MEDSAM, TINY
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


def test_a_missing_runtime_falls_back_to_eager_with_one_line(cache, monkeypatch, caplog):
    monkeypatch.setattr(engines, "_importable", lambda name: name != "openvino")
    model = small_lite_model()
    encoder = model.image_encoder
    with caplog.at_level(logging.WARNING):
        assert use_engine(model, "openvino") == "eager"
    assert model.image_encoder is encoder
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
