"""The fine-tuning configuration: one TOML file, one frozen dataclass per section.

Unknown sections or keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from RobustMedSAMLib.errors import InputError

MODES = ("decoder", "svd", "full")
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
    under torchrun each of N processes takes about batch_size / N of it."""

    mode: str = "decoder"
    robust_image_blocks: bool = True
    steps: int = 100
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


@dataclass(frozen=True)
class DataSection:
    """source: medsegbench (``paths`` to ``{name}_{size}.npz``), volumes (``folder`` of
    image/label pairs), phantoms (synthetic), regions (``folder`` of unlabelled 2D
    images; automatic region masks, at most ``regions_per_image`` per image).
    ``max_samples``: per split, 0 = all. ``phantom_scenes``: "organs" (abdomen-like
    scenes only) or "mixed" (every third an organ scene, the others random scenes).
    ``phantom_mix``: phantom volumes added to a non-phantom source (both splits)."""

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
    """Weights of the loss terms (0 turns one off)."""

    dice: float = 1.0
    bce: float = 1.0
    focal: float = 0.0
    iou: float = 1.0
    align: float = 0.1


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
        unknown = sorted(set(values) - set(sections))
        if unknown:
            raise InputError(f"unknown config section(s) {unknown}; known: {sorted(sections)}")
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
        for key, value in (("train.steps", t.steps), ("train.batch_size", t.batch_size)):
            if value < 1:
                raise InputError(f"{key} must be at least 1, got {value}")
        if t.lr <= 0:
            raise InputError(f"train.lr must be positive, got {t.lr}")
        if not 0 <= d.val_fraction < 1 or not 0 <= c.clean_fraction <= 1:
            raise InputError(
                "data.val_fraction must be in [0, 1) and corruption.clean_fraction in [0, 1]"
            )
        if c.variants < 0 or p.points < 0 or p.corrections < 0:
            raise InputError(
                "corruption.variants, prompts.points and prompts.corrections must be >= 0"
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
        if d.phantom_mix < 0 or d.regions_per_image < 1:
            raise InputError(
                f"data.phantom_mix must be >= 0 (got {d.phantom_mix}) and "
                f"data.regions_per_image >= 1 (got {d.regions_per_image})"
            )
        if d.phantom_mix and d.source == "phantoms":
            raise InputError(
                "data.phantom_mix adds phantoms to another source; "
                "with source = 'phantoms' set phantom_volumes instead"
            )


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
        raise InputError(f"unknown key(s) {unknown} in [{name}]; known: {sorted(fields)}")
    out = {}
    for key, value in values.items():
        default = getattr(section_type(), key)
        out[key] = _coerce(f"{name}.{key}", value, default)
    return section_type(**out)


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise InputError(f"{key} must be a list, got {value!r}")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        raise InputError(f"{key} must be a {type(default).__name__}, got {value!r}")
    return value


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
