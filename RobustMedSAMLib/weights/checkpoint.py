"""Reading, checking, fusing and writing SAM-family checkpoints, strictly.

Checkpoints are untrusted input: ``.pth`` files load with ``weights_only=True``,
``.safetensors`` through safetensors. Unlike the reference loaders (which use
``strict=False``), every missing or unexpected key and every wrong shape is an
error that names the file and says what it looks like instead.
"""

from __future__ import annotations

import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

from RobustMedSAMLib.errors import CheckpointError
from RobustMedSAMLib.formats.atomic import atomic_output
from RobustMedSAMLib.model.config import KNOWN_ENCODERS, LITE_MEDSAM, LITE_ROBUST, ModelConfig
from RobustMedSAMLib.model.robust_decoder import init_residual_from_plain
from RobustMedSAMLib.model.sam import SegmentAnythingModel

StateDict = dict[str, torch.Tensor]
PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
ROBUST_MARKER = "mask_decoder.custom_robust_token.weight"
TINY_VIT_MARKER = "image_encoder.patch_embed.seq.0.c.weight"
WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")
CONFIG_METADATA_KEY = "robustmedsam.config"
#: what torch.load raises on a damaged legacy or zip checkpoint, besides UnpicklingError
DAMAGED_FILE_ERRORS = (RuntimeError, EOFError, OSError, ValueError, LookupError, TypeError,
                       struct.error, AssertionError)  # fmt: skip


def read_state_dict(path: str | Path) -> StateDict:
    """All tensors of a checkpoint file, with ``module.`` prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
    else:
        state = _read_torch(path)
    return {re.sub(r"^module\.", "", key): value for key, value in state.items()}


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def _read_torch(path: Path) -> StateDict:
    """A ``.pth`` state dict; the zip format is memory-mapped, so tensors are read only
    when used (after their shapes are checked)."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); download it again")
    try:
        zipped = zipfile.is_zipfile(path)  # raises BadZipFile on some damaged ends
        if not _starts_as_torch_file(path):
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint (neither torch's zip format nor a "
                "pickle); give the .pth or .safetensors file"
            )
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to load (weights_only=True): damaged, or it holds Python "
            f"objects other than tensors ({_unpickler_reason(error)})"
        ) from None
    # torch's unpickler fails on a damaged file in many ways (IndexError, struct.error...)
    except (*DAMAGED_FILE_ERRORS, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint ({_first_line(error)}); download it again"
        ) from None
    for key in WRAPPER_KEYS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise CheckpointError(f"{path}: not a model state dict (a mapping of names to tensors)")
    return loaded


def _starts_as_torch_file(path: Path) -> bool:
    """A zip (torch's format; its first local header) or a pickle of protocol 2 or later
    (torch's legacy format): the first bytes, so a truncated file still qualifies."""
    with path.open("rb") as handle:
        start = handle.read(4)
    return start == b"PK\x03\x04" or start[:1] == b"\x80"


def _unpickler_reason(error: BaseException) -> str:
    """What torch's weights-only unpickler stopped at (``Unsupported global: GLOBAL x.Y``,
    ``Unsupported operand 149``), without its advice to load the file unsafely."""
    text = str(error).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return re.split(r" was not an allowed| Please ", lines[0])[0] if lines else "not tensors"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def is_robust(state: StateDict) -> bool:
    """True when the state dict carries RobustSAM's robust decoder modules."""
    return ROBUST_MARKER in state


def infer_config(state: StateDict, path: str | Path = "checkpoint") -> ModelConfig:
    """The model shape implied by a checkpoint's image encoder and decoder tensors
    (LiteMedSAM's TinyViT is recognised by its stem and has one shape); CheckpointError
    when they cannot be a SAM-family encoder (checked before any model is built, so a
    forged shape cannot make one that exhausts memory)."""
    if TINY_VIT_MARKER in state:
        return LITE_ROBUST if is_robust(state) else LITE_MEDSAM
    _check_encoder_tensors(state, path)
    try:
        patch = state["image_encoder.patch_embed.proj.weight"]
        grid = state["image_encoder.pos_embed"].shape[1]
        blocks = sorted(
            {
                int(m.group(1))
                for k in state
                if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))
            }
        )
        rel = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in blocks]
        dim = patch.shape[0]
        layers = {
            int(m.group(1))
            for k in state
            if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))
        }
    except KeyError as error:
        raise CheckpointError(
            f"{path}: no SAM-family image encoder ({error.args[0]} missing)"
        ) from None
    windowed = [r.shape[0] for r in rel if r.shape[0] != 2 * grid - 1]
    known = KNOWN_ENCODERS.get(dim)
    return ModelConfig(
        image_size=grid * patch.shape[2],
        patch_size=patch.shape[2],
        encoder_embed_dim=dim,
        encoder_depth=len(blocks),
        encoder_num_heads=dim // rel[0].shape[1],
        encoder_global_attn_indexes=tuple(
            i for i, r in zip(blocks, rel, strict=True) if r.shape[0] == 2 * grid - 1
        ),
        window_size=(windowed[0] + 1) // 2 if windowed else 14,
        prompt_embed_dim=state["image_encoder.neck.0.weight"].shape[0],
        decoder_depth=len(layers) or 2,
        decoder_mlp_dim=_shape(state, "mask_decoder.transformer.layers.0.mlp.lin1.weight", 0, 2048),
        decoder_num_heads=known.decoder_num_heads if known else 8,
        iou_head_hidden_dim=_shape(
            state, "mask_decoder.iou_prediction_head.layers.0.weight", 0, 256
        ),
        mask_in_chans=_shape(state, "prompt_encoder.mask_downscaling.3.weight", 0, 16),
    )


#: Largest model input side accepted from a checkpoint (SAM: 1024; LiteMedSAM: 256).
MAX_IMAGE_SIZE = 4096


def _check_encoder_tensors(state: StateDict, path: str | Path) -> None:
    """The encoder tensors ``infer_config`` reads have SAM's ranks and agree: patch
    embedding ``D x 3 x p x p``, position embedding ``1 x g x g x D`` with ``g * p`` at
    most MAX_IMAGE_SIZE, blocks 0..n-1 each with a ``rel_pos_h`` of ``(2w - 1) x D/heads``."""
    prefix = "image_encoder."
    patch = state.get(prefix + "patch_embed.proj.weight")
    pos = state.get(prefix + "pos_embed")
    if patch is None or pos is None:
        return  # infer_config names the missing key
    if patch.ndim != 4 or patch.shape[1] != 3 or patch.shape[2] != patch.shape[3]:
        raise CheckpointError(
            f"{path}: image_encoder.patch_embed.proj.weight has shape {tuple(patch.shape)}, "
            "not (width, 3, patch, patch): not a SAM-family checkpoint"
        )
    if pos.ndim != 4 or pos.shape[0] != 1 or pos.shape[1] != pos.shape[2]:
        raise CheckpointError(
            f"{path}: image_encoder.pos_embed has shape {tuple(pos.shape)}, "
            "not (1, grid, grid, width): not a SAM-family checkpoint"
        )
    if pos.shape[3] != patch.shape[0] or pos.shape[1] * patch.shape[2] > MAX_IMAGE_SIZE:
        raise CheckpointError(
            f"{path}: image_encoder.pos_embed {tuple(pos.shape)} does not fit the patch "
            f"embedding {tuple(patch.shape)} or implies an input over {MAX_IMAGE_SIZE} pixels"
        )
    blocks = sorted(
        {int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
    )
    if blocks != list(range(len(blocks))) or not blocks:
        raise CheckpointError(
            f"{path}: the image encoder's blocks are {blocks or 'missing'}; "
            "expected blocks 0..n-1: the checkpoint is incomplete"
        )
    for i in blocks:
        rel = state.get(f"{prefix}blocks.{i}.attn.rel_pos_h")
        if rel is None or rel.ndim != 2 or rel.shape[1] == 0 or patch.shape[0] % rel.shape[1]:
            shape = "missing" if rel is None else f"of shape {tuple(rel.shape)}"
            raise CheckpointError(
                f"{path}: image_encoder.blocks.{i}.attn.rel_pos_h is {shape}, "
                "not (2 * window - 1, head width)"
            )
    neck = state.get(prefix + "neck.0.weight")
    if neck is not None and neck.ndim != 4:
        raise CheckpointError(
            f"{path}: image_encoder.neck.0.weight has shape {tuple(neck.shape)}, not 4-D"
        )


def _shape(state: StateDict, key: str, axis: int, default: int) -> int:
    return state[key].shape[axis] if key in state else default


def check_state_dict(
    expected: StateDict, state: StateDict, path: str | Path, parts: tuple[str, ...] = PARTS
) -> None:
    """Raise CheckpointError unless ``state`` has exactly the keys and shapes of ``expected``
    within ``parts`` (BatchNorm's unused ``num_batches_tracked`` counters may be absent)."""
    want = {k: v for k, v in expected.items() if k.split(".")[0] in parts}
    have = {k: v for k, v in state.items() if k.split(".")[0] in parts}
    missing = [k for k in want if k not in have and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in have if k not in want]
    wrong = [
        f"{k} {tuple(have[k].shape)} (expected {tuple(want[k].shape)})"
        for k in want
        if k in have and have[k].shape != want[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes ({_few(wrong)})")
    if problems:
        raise CheckpointError(f"{path}: does not fit the model: " + "; ".join(problems))


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


def _describe(state: StateDict) -> str:
    if not any(k.startswith("image_encoder.") for k in state):
        return "it has no image encoder"
    if TINY_VIT_MARKER in state:
        return "it is a " + (
            "RobustMedSAM-Lite checkpoint (TinyViT encoder, robust decoder)"
            if is_robust(state)
            else "LiteMedSAM checkpoint (TinyViT encoder, plain decoder)"
        )
    return (
        "it is a RobustSAM-layout checkpoint"
        if is_robust(state)
        else ("it is a SAM-layout checkpoint (SAM, MedSAM or MedicoSAM)")
    )


def expect_layout(state: StateDict, path: str | Path, robust: bool) -> None:
    """Check that a checkpoint is of the layout the caller asked for, else say what it is."""
    if robust and not is_robust(state):
        raise CheckpointError(
            f"{path}: expected RobustSAM's robust mask decoder (mask_decoder.custom_robust_token"
            f" and its modules) but {_describe(state)}; give RobustSAM's checkpoint"
        )
    if not robust and is_robust(state):
        raise CheckpointError(
            f"{path}: expected a SAM-layout checkpoint but {_describe(state)}; "
            "use --model robustsam or fused for it"
        )


def load_model(
    path: str | Path,
    robust: bool | None = None,
    config: ModelConfig | None = None,
    device: torch.device | str = "cpu",
) -> SegmentAnythingModel:
    """Build the model a checkpoint describes and load it strictly.

    robust: None accepts either layout; True/False insists on one. config: None infers the
    shape from the tensors (ViT-B/L/H and smaller sizes).
    """
    state = read_state_dict(path)
    if robust is None:
        robust = is_robust(state)
    expect_layout(state, path, robust)
    config = config or infer_config(state, path)
    # built for real, not on torch's meta device: meta factories import torch._dynamo
    # and sympy (0.15 GB resident for the rest of the process)
    model = SegmentAnythingModel(config, robust=robust)
    check_state_dict(model.state_dict(), state, path)
    model.load_state_dict(state, strict=False)  # keys checked above
    return model.to(device)


def robust_lite_from_litemedsam(lite_state: StateDict, path: str | Path) -> SegmentAnythingModel:
    """RobustMedSAM-Lite before training: LiteMedSAM's encoder, prompt encoder and decoder
    (a LiteMedSAM state dict, checked strictly), its robust decoder started as the plain
    one (``init_residual_from_plain``: the same masks as LiteMedSAM)."""
    expect_layout(lite_state, path, robust=False)
    if TINY_VIT_MARKER not in lite_state:
        raise CheckpointError(f"{path}: {_describe(lite_state)}; expected LiteMedSAM's")
    plain = SegmentAnythingModel(LITE_MEDSAM, robust=False)  # not on meta: see load_model
    check_state_dict(plain.state_dict(), lite_state, path)
    plain.load_state_dict(lite_state, strict=False)  # keys checked above
    model = SegmentAnythingModel(LITE_ROBUST, robust=True)
    model.image_encoder = plain.image_encoder
    model.prompt_encoder = plain.prompt_encoder
    init_residual_from_plain(model.mask_decoder, plain.mask_decoder)
    return model.eval()


def robust_lite_with_decoder(
    lite_state: StateDict, decoder_state: StateDict, lite_path: str | Path, decoder_path: str | Path
) -> SegmentAnythingModel:
    """RobustMedSAM-Lite from LiteMedSAM's checkpoint and a decoder file holding exactly
    the robust decoder's ``mask_decoder.*`` tensors (strict: every key and shape)."""
    model = robust_lite_from_litemedsam(lite_state, lite_path)
    others = sorted(k for k in decoder_state if not k.startswith("mask_decoder."))
    if others:
        raise CheckpointError(
            f"{decoder_path}: expected only RobustMedSAM-Lite's mask_decoder.* tensors, "
            f"found {_few(others)}"
        )
    expect_layout(decoder_state, decoder_path, robust=True)
    check_state_dict(model.state_dict(), decoder_state, decoder_path, parts=("mask_decoder",))
    model.load_state_dict(decoder_state, strict=False)  # checked above
    return model


def fuse_state_dicts(
    encoder_state: StateDict,
    decoder_state: StateDict,
    encoder_path: str | Path = "encoder",
    decoder_path: str | Path = "decoder",
) -> StateDict:
    """The fused model: ``image_encoder.*`` of one checkpoint (MedSAM), prompt encoder and
    robust ``mask_decoder.*`` of another (RobustSAM); checked part by part."""
    expect_layout(decoder_state, decoder_path, robust=True)
    enc_config = infer_config(encoder_state, encoder_path)
    dec_config = infer_config(decoder_state, decoder_path)
    if enc_config != dec_config:
        raise CheckpointError(
            f"{encoder_path} and {decoder_path} are of different sizes "
            f"(encoder width {enc_config.encoder_embed_dim} vs {dec_config.encoder_embed_dim}); "
            "fuse checkpoints of the same ViT size"
        )
    with torch.device("meta"):  # shapes only
        expected = SegmentAnythingModel(enc_config, robust=True).state_dict()
    check_state_dict(expected, encoder_state, encoder_path, parts=("image_encoder",))
    check_state_dict(
        expected, decoder_state, decoder_path, parts=("prompt_encoder", "mask_decoder")
    )
    fused = {k: v for k, v in encoder_state.items() if k.startswith("image_encoder.")}
    fused.update(
        {
            k: v
            for k, v in decoder_state.items()
            if k.split(".")[0] in ("prompt_encoder", "mask_decoder")
        }
    )
    return fused


def save_state_dict(state: StateDict, path: str | Path, config: ModelConfig | None = None) -> Path:
    """Write a checkpoint atomically: ``.safetensors`` (with the config as metadata) or a
    plain ``.pth`` state dict in the published key layout (no prefix, tensors only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_output(path) as temporary:
        if path.suffix == ".safetensors":
            import json

            from safetensors.torch import save_file

            meta = {CONFIG_METADATA_KEY: json.dumps(config.to_dict())} if config else None
            save_file(tensors, str(temporary), metadata=meta)
        else:
            torch.save(tensors, temporary)
    return path
