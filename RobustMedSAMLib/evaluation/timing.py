"""Count and time a predictor's encoder and decoder calls (for run-time estimates).

Timings never go into the results CSV (it must be identical between runs); the
command line writes them to ``timings.json`` beside it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass


@dataclass
class CallTimes:
    """Encoder and decoder calls of one model and their total seconds."""

    encoder_calls: int = 0
    encoder_seconds: float = 0.0
    decoder_calls: int = 0
    decoder_seconds: float = 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        for part in ("encoder", "decoder"):
            calls = out[f"{part}_calls"]
            out[f"{part}_seconds_per_call"] = out[f"{part}_seconds"] / calls if calls else None
        return out


class TimedPredictor:
    """Wraps a predictor; ``encode`` and ``predict`` are timed into ``times``; every
    other attribute is the wrapped predictor's."""

    def __init__(self, predictor) -> None:
        self._predictor = predictor
        self.times = CallTimes()

    def encode(self, image, window=None):
        start = time.perf_counter()
        encoded = self._predictor.encode(image, window)
        self.times.encoder_seconds += time.perf_counter() - start
        self.times.encoder_calls += 1
        return encoded

    def predict(self, prompt):
        start = time.perf_counter()
        prediction = self._predictor.predict(prompt)
        self.times.decoder_seconds += time.perf_counter() - start
        self.times.decoder_calls += 1
        return prediction

    def __getattr__(self, name: str):
        return getattr(self._predictor, name)
