"""The fine-tuning configuration: one TOML file, one frozen dataclass per section.

Unknown sections or keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from RobustMedSAMLib.errors import InputError

MODES = ("decoder", "svd", "full")
OPTIMIZERS = ("adamw", "sgd")
SOURCES = ("medsegbench", "volumes", "phantoms", "regions")
AXES = {"axial": 0, "coronal": 1, "sagittal": 2}


@dataclass(frozen=True)
class ModelSection:
    """Where the weights come from: ``checkpoint`` (a file or registry name), the
    ``encoder`` + ``decoder`` pair of a fused model, or ``init = "random"`` with ``size``."""

    init: str = "checkpoint"
    checkpoint: str = ""
    encoder: str = ""
    decoder: str = ""
    size: str = "tiny"
    robust: bool = True
    preprocessing: str = "medsam"


@dataclass(frozen=True)
class TrainSection:
    """mode: decoder (encoders frozen), svd (singular values of encoder linears + decoder),
    full (everything). ``steps`` sets the schedule (warm-up then cosine).
    robust_image_blocks: train RobustSAM's feature blocks on the encoder outputs (as the
    paper does); false freezes them, and decoder mode then caches their output (on ViT-B
    most of a cached step's time is these blocks). ``batch_size`` is the global batch:
    under torchrun each of N processes takes about batch_size / N of it. optimizer:
    adamw, or sgd (momentum 0.9): SGD's weights move smoothly with float rounding, where
    Adam's first steps follow the sign of each gradient, tiny ones included.
    base_lr_scale: learning-rate factor for the starting decoder's parts that a box's
    single mask runs through (``BOX_PATH`` in the runner: the two-way transformer, the
    upscaling and mask token 0's hypernetwork); the robust blocks, the other tokens and
    the IoU head keep ``lr``. Below 1 it keeps the box behaviour while points are learnt.
    clean_margin: negative picks the best checkpoint by ``val_dice`` (degraded box); 0 or
    more picks, among the validations whose clean-box Dice is at most this much below
    step 0's (the untrained model), the one with the highest degraded box + point Dice
    (``val_dice + val_point_dice``); step 0 itself is one of them."""

    mode: str = "decoder"
    robust_image_blocks: bool = True
    steps: int = 100
    optimizer: str = "adamw"
    batch_size: int = 4
    lr: float = 1e-4
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    val_every: int = 50
    checkpoint_every: int = 50
    log_every: int = 1
    export: str = "safetensors"
    base_lr_scale: float = 1.0
    clean_margin: float = -1.0


@dataclass(frozen=True)
class DataSection:
    """source: medsegbench (``paths`` to ``{name}_{size}.npz``), volumes (``folder`` of
    image/label pairs), phantoms (synthetic), regions (``folder`` of unlabelled 2D
    images; automatic region masks, at most ``regions_per_image`` per image).
    ``max_samples``: per split, 0 = all. ``phantom_scenes``: "organs" (abdomen-like
    scenes only) or "mixed" (every third an organ scene, the others random scenes).
    ``phantom_mix``: phantom volumes added to a non-phantom source (both splits).
    ``teacher_targets``: the target of every automatic region sample (source "regions")
    becomes the starting model's own mask on the clean image from the region's tight
    box, for the clean and every corrupted version (robustness without labels: the
    decoder learns to give on a degraded image what it gave on the clean one)."""

    source: str = "phantoms"
    paths: tuple[str, ...] = ()
    folder: str = ""
    axis: str = "axial"
    label_value: int = 0
    val_fraction: float = 0.2
    max_samples: int = 0
    max_slices_per_volume: int = 0
    min_foreground: int = 10
    val_samples: int = 32
    phantom_volumes: int = 6
    phantom_shape: tuple[int, int, int] = (24, 64, 64)
    phantom_scenes: str = "organs"
    phantom_mix: int = 0
    regions_per_image: int = 8
    teacher_targets: bool = False


@dataclass(frozen=True)
class CorruptionSection:
    """Each image has ``variants`` corrupted versions (fixed per image, so they can be
    cached); a training sample is clean with probability ``clean_fraction``."""

    names: tuple[str, ...] = ()
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    variants: int = 3
    clean_fraction: float = 0.25


@dataclass(frozen=True)
class PromptSection:
    """MedicoSAM-style: a jittered box (probability ``box_probability``) or ``points``
    positive points, then ``corrections`` iterative correction points. ``multimask``: a
    lone first point is trained as SAM trained it, on the three candidate masks that
    inference decodes for it (the best one's loss, every candidate's IoU score); off:
    on the single-mask output only (docs/fine-tuning.md says when each does better)."""

    box_probability: float = 0.5
    box_jitter: float = 0.1
    points: int = 1
    corrections: int = 2
    multimask: bool = False


@dataclass(frozen=True)
class LossSection:
    """Weights of the loss terms (0 turns one off). distill: for a box prompt, BCE of the
    mask logits against the starting decoder's mask probabilities from the same box on the
    clean image (keeps the box behaviour of the model the run starts from)."""

    dice: float = 1.0
    bce: float = 1.0
    focal: float = 0.0
    iou: float = 1.0
    align: float = 0.1
    distill: float = 0.0


@dataclass(frozen=True)
class SvdSection:
    """SVD fine-tuning of the image encoder's linear layers named in ``targets``;
    ``rank`` 0 trains every singular value, r > 0 only the top r."""

    rank: int = 0
    targets: tuple[str, ...] = ("qkv", "proj", "lin1", "lin2")
    train_decoder: bool = True


@dataclass(frozen=True)
class CacheSection:
    """Embedding cache for decoder-only training (``dir`` empty: RUN_DIR/cache)."""

    enabled: bool = True
    dir: str = ""


@dataclass(frozen=True)
class TrainingConfig:
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    corruption: CorruptionSection = field(default_factory=CorruptionSection)
    prompts: PromptSection = field(default_factory=PromptSection)
    loss: LossSection = field(default_factory=LossSection)
    svd: SvdSection = field(default_factory=SvdSection)
    cache: CacheSection = field(default_factory=CacheSection)

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: Path | None = None) -> TrainingConfig:
        """Build and check a config; relative paths are resolved against ``base``."""
        sections = {f.name: f for f in dataclasses.fields(cls)}
        if not isinstance(values, dict):
            raise InputError(f"a config must be a table of sections, got {_short(values)}")
        unknown = sorted(set(values) - set(sections))
        if unknown:
            raise InputError(
                f"unknown config section(s) {_short(unknown)}; known: {', '.join(sorted(sections))}"
            )
        built = {}
        for name, f in sections.items():
            section_type = f.default_factory().__class__  # type: ignore[misc]
            built[name] = _section(section_type, name, values.get(name, {}))
        config = cls(**built)
        if base is not None:
            config = config.resolve_paths(base)
        config.check()
        return config

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainingConfig:
        path = Path(path)
        return cls.from_dict(read_toml(path), base=path.parent.resolve())

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: {k: list(v) if isinstance(v, tuple) else v for k, v in _asdict(self, f.name)}
            for f in dataclasses.fields(self)
        }

    def to_toml(self) -> str:
        """The config as TOML text (what the run directory keeps as ``config.toml``)."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
            lines.append("")
        return "\n".join(lines)

    def resolve_paths(self, base: Path) -> TrainingConfig:
        """Relative file paths made absolute against ``base`` (registry names kept)."""

        def fix(value: str) -> str:
            return str((base / Path(value).expanduser()).resolve()) if value else value

        checkpoint = self.model.checkpoint
        if checkpoint and ("/" in checkpoint or "." in checkpoint):  # else a registry name
            checkpoint = fix(checkpoint)
        model = dataclasses.replace(
            self.model,
            checkpoint=checkpoint,
            encoder=fix(self.model.encoder),
            decoder=fix(self.model.decoder),
        )
        data = dataclasses.replace(
            self.data, paths=tuple(fix(p) for p in self.data.paths), folder=fix(self.data.folder)
        )
        cache = dataclasses.replace(self.cache, dir=fix(self.cache.dir))
        return dataclasses.replace(self, model=model, data=data, cache=cache)

    def check(self) -> None:
        """Raise InputError for values that cannot work, naming the key."""
        t, m, d, c, p = self.train, self.model, self.data, self.corruption, self.prompts
        _choice("train.mode", t.mode, MODES)
        _choice("train.optimizer", t.optimizer, OPTIMIZERS)
        _choice("data.source", d.source, SOURCES)
        _choice("data.axis", d.axis, tuple(AXES))
        _choice("data.phantom_scenes", d.phantom_scenes, ("organs", "mixed"))
        _choice("model.init", m.init, ("checkpoint", "random"))
        _choice("model.preprocessing", m.preprocessing, ("medsam", "sam", "litemedsam"))
        _choice("train.export", t.export, ("safetensors", "pth"))
        if m.init == "random":
            _choice("model.size", m.size, ("tiny", "vit_b"))
        elif not m.checkpoint and not (m.encoder and m.decoder):
            raise InputError(
                "[model] needs checkpoint = ..., or encoder and decoder, or init = 'random'"
            )
        self._check_ranges()
        if t.lr <= 0:
            raise InputError(f"train.lr must be positive, got {t.lr}")
        if not 0 <= d.val_fraction < 1 or not 0 <= c.clean_fraction <= 1:
            raise InputError(
                "data.val_fraction must be in [0, 1) and corruption.clean_fraction in [0, 1]"
            )
        if p.points == 0 and p.box_probability < 1:
            raise InputError(
                "prompts.points = 0 needs prompts.box_probability = 1 (a box every time)"
            )
        if any(s not in range(1, 6) for s in c.severities) or not c.severities:
            raise InputError(f"corruption.severities must be in 1..5, got {list(c.severities)}")
        if c.names:
            from RobustMedSAMLib.corruptions import CORRUPTIONS

            unknown = [n for n in c.names if n not in CORRUPTIONS]
            if unknown:
                raise InputError(f"unknown corruption(s) {unknown}; known: {sorted(CORRUPTIONS)}")
        if d.source == "medsegbench" and not d.paths:
            raise InputError("data.source = 'medsegbench' needs paths = ['..._{size}.npz', ...]")
        if d.source in ("volumes", "regions") and not d.folder:
            raise InputError(f"data.source = '{d.source}' needs folder = '...'")
        if d.phantom_mix and d.source == "phantoms":
            raise InputError(
                "data.phantom_mix adds phantoms to another source; "
                "with source = 'phantoms' set phantom_volumes instead"
            )

    def _check_ranges(self) -> None:
        """Every number finite and inside its range (``RANGES``), naming the key."""
        for section in dataclasses.fields(self):
            for key, value in _asdict(self, section.name):
                name = f"{section.name}.{key}"
                for item in value if isinstance(value, tuple) else (value,):
                    if isinstance(item, float) and not math.isfinite(item):
                        raise InputError(f"{name} must be a finite number, got {item}")
                if name in RANGES:
                    low, high = RANGES[name]
                    for item in value if isinstance(value, tuple) else (value,):
                        if item < low or (high is not None and item > high):
                            where = f"at least {low}" if high is None else f"in {low}..{high}"
                            raise InputError(f"{name} must be {where}, got {item}")
        if len(self.data.phantom_shape) != 3:
            raise InputError(
                f"data.phantom_shape must be 3 numbers (slices, rows, columns), "
                f"got {list(self.data.phantom_shape)}"
            )


#: Inclusive ``(low, high)`` of the numeric keys (high None: no upper bound); for a list,
#: of each item. ``lr`` > 0 and the fractions are checked in ``check``.
RANGES: dict[str, tuple[float, float | None]] = {
    "train.steps": (1, None),
    "train.batch_size": (1, 65536),
    "train.min_lr_fraction": (0.0, 1.0),
    "train.weight_decay": (0.0, None),
    "train.warmup_steps": (0, None),
    "train.grad_clip": (0.0, None),
    "train.seed": (0, 2**32 - 1),
    "train.val_every": (1, None),
    "train.checkpoint_every": (1, None),
    "train.log_every": (1, None),
    "train.base_lr_scale": (0.0, 1.0),
    "train.clean_margin": (-1.0, 1.0),
    "data.label_value": (0, None),
    "data.max_samples": (0, None),
    "data.max_slices_per_volume": (0, None),
    "data.min_foreground": (0, None),
    "data.val_samples": (1, None),
    "data.phantom_volumes": (1, None),
    "data.phantom_shape": (1, 1024),
    "data.phantom_mix": (0, None),
    "data.regions_per_image": (1, None),
    "corruption.variants": (0, None),
    "prompts.box_probability": (0.0, 1.0),
    "prompts.box_jitter": (0.0, 1.0),
    "prompts.points": (0, None),
    "prompts.corrections": (0, None),
    "loss.dice": (0.0, None),
    "loss.bce": (0.0, None),
    "loss.focal": (0.0, None),
    "loss.iou": (0.0, None),
    "loss.align": (0.0, None),
    "loss.distill": (0.0, None),
    "svd.rank": (0, None),
}


def read_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file as a dict; InputError when it is missing or not TOML."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a valid TOML file ({error})") from None


def _asdict(config: TrainingConfig, section: str) -> list[tuple[str, Any]]:
    return list(dataclasses.asdict(getattr(config, section)).items())


def _section(section_type: type, name: str, values: Any) -> Any:
    if not isinstance(values, dict):
        raise InputError(f"[{name}] must be a table of key = value lines")
    fields = {f.name: f for f in dataclasses.fields(section_type)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InputError(
            f"unknown key(s) {_short(unknown)} in [{name}]; known: {', '.join(sorted(fields))}"
        )
    out = {}
    for key, value in values.items():
        default = getattr(section_type(), key)
        item_type = int if "int" in str(fields[key].type) else str
        out[key] = _coerce(f"{name}.{key}", value, default, item_type)
    return section_type(**out)


def _coerce(key: str, value: Any, default: Any, item_type: type = str) -> Any:
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise InputError(f"{key} must be a list, got {_short(value)}")
        wrong = [v for v in value if type(v) is not item_type]
        if wrong:
            raise InputError(
                f"{key} must be a list of {item_type.__name__}s, got {_short(wrong[0])} in it"
            )
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(f"{key} must be true or false, got {_short(value)}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        kind = {"str": "text (in quotes)", "int": "whole number", "float": "number"}
        raise InputError(f"{key} must be a {kind[type(default).__name__]}, got {_short(value)}")
    return value


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{key} = {value!r} is not one of {', '.join(choices)}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
