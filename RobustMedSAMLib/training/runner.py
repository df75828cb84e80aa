"""The fine-tuning loop behind ``robustmedsam finetune``: one runner, every mode.

Reproducible by construction: the batch of step s (images, corrupted variants,
prompts) is a function of (seed, s) only, and the learning rate a function of s, so
a run stopped and resumed from its saved state computes the same losses as one never
stopped. Progress goes out as JSON lines (``emit``) and into ``train.log``.
Multi-process (``torchrun``, ``WORLD_SIZE`` > 1): ``train.batch_size`` is the global
batch of a step. Every rank draws the same global batch (order, corrupted variants,
prompt randomness per sample, all from (seed, step)) and computes its contiguous share;
DDP averages the gradients, with the loss terms weighted so that the average is the
global batch's mean. So N processes train (to float rounding) the same weights as one,
and a run resumes with any number of processes. Rank 0 alone writes files and JSON
lines; it builds the embedding cache while the others wait, then they all read it.

The parts: ``step`` (inputs, targets and the forward that gives the losses),
``batches`` (which samples each step and rank train on), ``ddp`` (the process group),
and here the loop, validation, caches and saving.
"""

from __future__ import annotations

import copy
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from RobustMedSAMLib.distributed import dist_info
from RobustMedSAMLib.errors import CancelledError, InputError
from RobustMedSAMLib.formats.atomic import write_text
from RobustMedSAMLib.training import checkpointing as ckpt
from RobustMedSAMLib.training.batches import BatchPlan
from RobustMedSAMLib.training.config import TrainingConfig
from RobustMedSAMLib.training.data import load_data
from RobustMedSAMLib.training.ddp import RankGroup
from RobustMedSAMLib.training.decoding import decode_paired
from RobustMedSAMLib.training.embedding_cache import (
    EmbeddingCache,
    build_cache,
    cache_key,
    encoder_digest,
    module_digest,
)
from RobustMedSAMLib.training.losses import dice_score
from RobustMedSAMLib.training.model_setup import build_model, select_trained, set_train_mode
from RobustMedSAMLib.training.simulated_prompts import Prompts, boxes_from_masks, points_in_masks
from RobustMedSAMLib.training.step import Inputs, TrainStep, learning_rate

log = logging.getLogger(__name__)
Emit = Callable[[dict], None]


def json_line(record: dict) -> None:
    """Write one JSON object per line on stdout (what the Slicer module reads)."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


@dataclass
class RunOptions:
    """resume: continue RUN_DIR; stop_after: stop as an interrupt would after that many
    steps (tests, time-boxed jobs); emit: where JSON records go (None: stdout)."""

    resume: bool = False
    stop_after: int | None = None
    emit: Emit | None = None
    handle_signals: bool = True


@dataclass
class RunResult:
    status: str  # "done" or "stopped"
    step: int
    losses: list[float] = field(default_factory=list)
    best_dice: float = float("nan")
    model_path: Path | None = None


# The runner ---------------------------------------------------------------------------


STOP_SIGNALS = tuple(
    sig for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGBREAK", None)) if sig
)


class StopFlag:
    """Set by SIGINT/SIGTERM (SIGBREAK on Windows, where ``FinetuneProcess.stop`` sends
    CTRL_BREAK_EVENT) or ``stop_after``; the loop finishes its step, saves, exits."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, lambda *_: self.event.set())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Holds a run: data, model, optimizer, caches; ``run()`` trains and returns a RunResult."""

    def __init__(self, config: TrainingConfig, run_dir: Path, options: RunOptions) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.options = options
        self.dist = dist_info()
        self.emit_fn = options.emit or json_line
        self.stop = StopFlag()
        if self.dist.main or options.resume:  # rank 0 may already be writing a new run
            _check_run_dir(self.run_dir, config, options.resume)
        t = config.train
        from RobustMedSAMLib.device import prepare_device, select_device

        self.device = prepare_device(select_device(t.device))  # CPU: flush denormals
        if self.dist.world > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if t.batch_size < self.dist.world:
            raise InputError(
                f"train.batch_size = {t.batch_size} is the batch of a step over all "
                f"{self.dist.world} processes; make it at least {self.dist.world}"
            )
        train, val = load_data(config.data, t.seed)
        self.model = build_model(config.model, t.seed).to(self.device)
        self.trained = select_trained(self.model, config)
        self.model.to(self.device)
        self.train_inputs = Inputs(train, config, self.model)
        self.val_inputs = Inputs(val, config, self.model)
        self.train_indices = [i for i in range(len(train)) if self.train_inputs.target(i).any()]
        if not self.train_indices:
            raise InputError(
                "every training mask vanishes at the model's low resolution; use larger objects"
            )
        self.use_cache = t.mode == "decoder" and config.cache.enabled
        encoder_trains = any(n.startswith("image_encoder.") for n in self.trained)
        # the starting decoder, for teacher targets and distillation (before a resume)
        self.base_decoder = None
        if config.data.teacher_targets or config.loss.distill > 0:
            self.base_decoder = copy.deepcopy(self.model.mask_decoder).eval()
            self.base_decoder.requires_grad_(False)
        teacher = self.base_decoder if config.loss.distill > 0 else None
        self.step_module = TrainStep(self.model, config, encoder_trains, teacher)
        self.ranks = RankGroup(self.dist, self.device)
        self.ddp = self.ranks.wrap(self.step_module, self.model)
        groups = parameter_groups(self.model, t.weight_decay, t.base_lr_scale)
        if t.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=0.9)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=t.lr)
        self.plan = BatchPlan(config, self.train_indices, self.dist.world, self.dist.rank)
        self.caches: dict[str, EmbeddingCache] = {}
        self.step, self.best, self.losses = 0, -1.0, []
        self.baseline: dict[str, float] = {}  # step 0's validation (train.clean_margin)

    # --- files and records ---

    def emit(self, record: dict) -> None:
        if self.dist.main:
            self.emit_fn(record)

    def _start_files(self) -> logging.Handler | None:
        if not self.dist.main:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.options.resume:
            write_text(self.run_dir / "config.toml", self.config.to_toml())
        handler = logging.FileHandler(self.run_dir / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.INFO)
        return handler

    # --- data for a step ---

    def sources(
        self, split: str, indices: list[int], variants: list[int], any_corrupted: bool = False
    ) -> tuple[dict, dict | None]:
        """Model inputs of the chosen variants and of the clean images (for alignment)."""
        inputs = self.train_inputs if split == "train" else self.val_inputs
        loss = self.config.loss
        need_clean = (loss.align > 0 and (any_corrupted or any(variants))) or (
            split == "train" and loss.distill > 0
        )

        def source(variant_list: list[int]) -> dict:
            if split in self.caches:
                return self.caches[split].get(indices, variant_list, self.device)
            images = torch.cat(
                [inputs.model_input(i, v) for i, v in zip(indices, variant_list, strict=True)]
            )
            return {"images": images.to(self.device)}

        return source(variants), source([0] * len(indices)) if need_clean else None

    def prepare_caches(self) -> None:
        """Build (or reuse) the train and validation embedding caches (decoder mode)."""
        if not self.use_cache:
            return
        base = Path(self.config.cache.dir) if self.config.cache.dir else self.run_dir / "cache"
        model = self.model
        frozen_blocks = model.robust and not self.config.train.robust_image_blocks
        digest = encoder_digest(model.image_encoder)
        if frozen_blocks:
            digest += module_digest(model.mask_decoder.fourier_first_layer_features)
            digest += module_digest(model.mask_decoder.fourier_last_layer_features)
        set_train_mode(model, self.trained, False)

        def encode(images: torch.Tensor) -> dict[str, torch.Tensor]:
            embedding, early = model.image_encoder.forward_with_early(images.to(self.device))
            if not model.robust:
                return {"embedding": embedding}
            if frozen_blocks:
                robust = model.mask_decoder.robust_image_features(embedding, early)
                return {"embedding": embedding, "robust": robust}
            return {"embedding": embedding, "early": early}

        for split, inputs, variants in (
            ("train", self.train_inputs, self.config.corruption.variants),
            ("val", self.val_inputs, min(1, self.config.corruption.variants)),
        ):
            if len(inputs.data) == 0:
                continue
            firsts, rows = inputs.firsts, inputs.rows
            key = cache_key(
                {
                    "rows": "distinct images",
                    "weights": digest,
                    "frozen_blocks": frozen_blocks,
                    "data": inputs.data.fingerprint(),
                    "corruption": self.config.to_dict()["corruption"],
                    "seed": self.config.train.seed,
                    "preprocessing": self.config.model.preprocessing,
                    "variants": variants,
                }
            )
            folder = base / f"{split}-{key}"
            started = time.perf_counter()
            if self.dist.main:
                self.caches[split] = build_cache(
                    folder,
                    key,
                    encode,
                    len(firsts),
                    variants,
                    lambda row, variant, f=firsts, i=inputs: i.model_input(f[row], variant),
                    progress=lambda done, total, s=split: self.emit(
                        {"event": "cache", "split": s, "done": done, "total": total}
                    ),
                    cancel=self.stop.event.is_set,
                )
            self.ranks.barrier(long=True)
            if not self.dist.main:
                self.caches[split] = _open_shared_cache(folder)
            self.caches[split].rows = rows
            log.info(
                "embedding cache %s: %d images x %d versions, %.1f MB, %.1f s",
                split, len(firsts), variants + 1, self.caches[split].nbytes / 1e6,
                time.perf_counter() - started,
            )  # fmt: skip

    @torch.no_grad()
    def set_teacher_targets(self) -> None:
        """Replace each region sample's target by the starting decoder's mask from the
        region's tight box on the clean image (``data.teacher_targets``); a region whose
        teacher mask is empty keeps its own mask."""
        if self.base_decoder is None:
            return
        scale = self.model.config.image_size / self.model.config.low_res_size
        replaced = 0
        for split, inputs in (("train", self.train_inputs), ("val", self.val_inputs)):
            indices = [i for i, n in enumerate(inputs.data.names) if ":region" in n]
            for start in range(0, len(indices), 8):
                chunk = indices[start : start + 8]
                masks = inputs.targets(chunk).to(self.device)
                source, _ = self.sources(split, chunk, [0] * len(chunk))
                teacher = _teacher_masks(self.model, self.base_decoder, self.step_module,
                                         source, masks, scale)  # fmt: skip
                for index, mask in zip(chunk, teacher.cpu(), strict=True):
                    if mask.any():
                        inputs.replaced[index] = mask
                        replaced += 1
        log.info("teacher targets: %d region samples take the starting model's mask", replaced)

    # --- training ---

    def train_step(self, step: int) -> tuple[float, dict[str, float]]:
        batch = self.plan.batch_for(step)
        indices, variants = batch.indices, batch.variants
        source, clean = self.sources("train", indices, variants, batch.any_corrupted)
        masks = self.train_inputs.targets(indices).to(self.device)
        corrupted = torch.tensor([v > 0 for v in variants], device=self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, step) * group["lr_scale"]
        set_train_mode(self.model, self.trained, True)
        self.optimizer.zero_grad(set_to_none=True)
        total, terms = self.ddp(source, clean, masks, corrupted, batch.rng, batch.sample_rngs,
                                batch.weight, batch.align_weight)  # fmt: skip
        total.backward()
        if self.config.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.config.train.grad_clip
            )
        self.optimizer.step()
        return self.ranks.mean_over_ranks(float(total.detach()), terms)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean Dice from the tight box prompt on clean and on corrupted validation images
        (``val_dice_clean``, ``val_dice``; ``val_dice`` picks the best model), and from one
        point inside the mask as inference decodes it (``val_point_dice_clean``,
        ``val_point_dice``: three candidates, the best-scored one)."""
        inputs = self.val_inputs
        if len(inputs.data) == 0:
            return {}
        set_train_mode(self.model, self.trained, False)
        scale = self.model.config.image_size / self.model.config.low_res_size
        scores: dict[str, list[float]] = {}
        batch = self.config.train.batch_size
        for variant, key in ((0, "_clean"), (1, "")):
            if variant > self.config.corruption.variants:
                continue
            for start in range(0, len(inputs.data), batch):
                indices = list(range(start, min(start + batch, len(inputs.data))))
                masks = inputs.targets(indices).to(self.device)
                keep = masks.flatten(1).any(1)
                if not keep.any():
                    continue
                source, _ = self.sources("val", indices, [variant] * len(indices))
                embedding, robust = self.step_module.image_features(source)
                robust = robust[keep] if robust is not None else None
                for name, dice in self._val_dice(embedding[keep], robust, masks[keep], scale):
                    scores.setdefault(f"val_{name}dice{key}", []).extend(dice.tolist())
        result = {k: float(np.mean(v)) for k, v in scores.items() if v}
        if "val_dice" not in result:
            result["val_dice"] = result.get("val_dice_clean", float("nan"))
        return result

    def _val_dice(self, embedding, robust, masks, scale):
        """(name, ``B`` Dice) from the tight box and from one point drawn inside the mask
        (decoded as the predictor decodes a lone point: the best-scored of three)."""
        boxes = boxes_from_masks(masks, np.random.default_rng(0), 0.0, scale)
        logits, _, _ = decode_paired(
            self.model, embedding, robust, Prompts(None, None, boxes.to(self.device))
        )
        yield "", dice_score(logits, masks)
        points = Prompts(*points_in_masks(masks, np.random.default_rng(0), 1, scale), None)
        logits, iou, _ = decode_paired(
            self.model, embedding, robust, points.to(self.device), multimask=True
        )
        yield "point_", dice_score(logits[torch.arange(len(logits)), iou.argmax(1)], masks)

    def save(self, tag_best: bool = False) -> Path:
        """State for resuming plus the exported ``last`` model (and ``best`` when asked)."""
        fmt = self.config.train.export
        if not self.dist.main:
            return self.run_dir
        ckpt.save_training_state(
            self.run_dir,
            {
                "step": self.step,
                "best": self.best,
                "losses": list(self.losses),
                "trained": ckpt.trained_state(self.model, self.trained),
                "optimizer": self.optimizer.state_dict(),
                "baseline": dict(self.baseline),
            },
        )
        path = ckpt.export_model(self.model, self.run_dir, "last", fmt)
        if tag_best:
            ckpt.export_model(self.model, self.run_dir, "best", fmt)
        return path

    def restore(self) -> None:
        if not (self.run_dir / ckpt.STATE_FILE).is_file():
            log.info("%s: no saved step yet; starting at step 0", self.run_dir)
            return
        state = ckpt.load_training_state(self.run_dir)
        self.model.load_state_dict(state["trained"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.best, self.losses = (
            int(state["step"]),
            float(state["best"]),
            list(state["losses"]),
        )
        self.baseline = dict(state.get("baseline", {}))
        log.info("resumed at step %d", self.step)

    def run(self) -> RunResult:
        handler = self._start_files()
        logger = logging.getLogger("RobustMedSAMLib")
        old_level = logger.level
        if handler is not None:
            logger.addHandler(handler)
            logger.setLevel(min(logging.INFO, logger.getEffectiveLevel()))
        if self.options.handle_signals:
            self.stop.install()
        try:
            return self._loop()
        finally:
            self.stop.restore()
            self.ranks.close()
            if handler is not None:
                logger.removeHandler(handler)
                logger.setLevel(old_level)
                handler.close()

    def _loop(self) -> RunResult:
        t = self.config.train
        if self.options.resume:
            self.restore()
        self.emit(
            {
                "event": "start",
                "mode": t.mode,
                "step": self.step,
                "total_steps": t.steps,
                "train_samples": len(self.train_indices),
                "val_samples": len(self.val_inputs.data),
                "trained_parameters": sum(
                    p.numel() for p in self.model.parameters() if p.requires_grad
                ),
                "device": str(self.device),
            }
        )
        log.info("run %s: mode %s, %d steps from step %d", self.run_dir, t.mode, t.steps, self.step)
        try:
            self.prepare_caches()
        except CancelledError:
            self.emit({"event": "stopped", "step": self.step, "best_val_dice": self.best})
            log.info("stopped while building the embedding cache (finished parts are kept)")
            return RunResult("stopped", self.step, list(self.losses), self.best, None)
        self.set_teacher_targets()
        if self.step == 0 and self.dist.main:
            baseline = self.validate()
            if baseline:
                self.baseline = baseline
                starts_best = self.config.train.clean_margin >= 0
                if starts_best:  # the untrained model is a candidate of the rule
                    self.best = selection_score(baseline, baseline, self.config.train.clean_margin)
                self.emit({"event": "val", "step": 0, **baseline, "best": starts_best})
                log.info("validation before training: %s", baseline)
                if starts_best:
                    self.save(tag_best=True)
        started, first = time.perf_counter(), self.step
        status = "done"
        while self.step < t.steps:
            loss, terms = self.train_step(self.step)
            self.step += 1
            self.losses.append(loss)
            elapsed = time.perf_counter() - started
            rate = (self.step - first) / max(elapsed, 1e-9)
            if self.step % t.log_every == 0 or self.step == t.steps:
                record = {
                    "event": "step",
                    "step": self.step,
                    "total_steps": t.steps,
                    "epoch": (self.step - 1) // self.plan.steps_per_epoch,
                    "loss": loss,
                    "losses": terms,
                    "lr": learning_rate(self.config, self.step - 1),
                    "samples_per_s": rate * t.batch_size,
                    "eta_s": (t.steps - self.step) / max(rate, 1e-9),
                }
                self.emit(record)
                log.info(
                    "step %d/%d loss %.4f (%s) lr %.2e", self.step, t.steps, loss,
                    ", ".join(f"{k} {v:.4f}" for k, v in terms.items()), record["lr"],
                )  # fmt: skip
            stopping = self.ranks.agree(
                self.stop.event.is_set()
                or (self.options.stop_after is not None and self.step >= self.options.stop_after)
            )
            if self.step % t.val_every == 0 or self.step == t.steps:
                self._validate_and_save()
            elif self.step % t.checkpoint_every == 0 or stopping:
                self.save()
            if stopping and self.step < t.steps:
                status = "stopped"
                break
        if self.step >= t.steps and not self.losses:
            self._validate_and_save()
        path = self.run_dir / ("last.safetensors" if t.export == "safetensors" else "last.pth")
        self.emit(
            {"event": status, "step": self.step, "best_val_dice": self.best, "model": str(path)}
        )
        log.info("%s at step %d; model %s", status, self.step, path)
        self.ranks.barrier()
        return RunResult(status, self.step, list(self.losses), self.best, path)

    def _validate_and_save(self) -> None:
        scores = self.validate() if self.dist.main else {}
        margin = self.config.train.clean_margin
        if margin >= 0 and scores and self.baseline:
            score = selection_score(scores, self.baseline, margin)
        else:
            score = scores.get("val_dice", float("nan"))
        improved = bool(scores) and score > self.best
        if improved:
            self.best = score
        if scores:
            self.emit({"event": "val", "step": self.step, **scores, "best": improved})
            log.info("validation at step %d: %s", self.step, scores)
        self.save(tag_best=improved or not scores)


#: Starting-decoder parts that a box's single mask (token 0) runs through
#: (``train.base_lr_scale``); the robust path's own blocks are not among them.
BOX_PATH = ("transformer.", "output_upscaling.", "output_hypernetworks_mlps.0.")


def parameter_groups(model: nn.Module, weight_decay: float, base_scale: float) -> list[dict]:
    """Optimizer groups of the trained parameters: weight decay on matrices only, and
    ``lr_scale`` ``base_scale`` for the mask decoder's ``BOX_PATH`` parts (1 elsewhere)."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        box_path = name.startswith(tuple(f"mask_decoder.{p}" for p in BOX_PATH))
        key = (parameter.ndim > 1, base_scale if box_path else 1.0)
        groups.setdefault(key, []).append(parameter)
    return [
        {"params": params, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale}
        for (decays, scale), params in sorted(groups.items(), key=lambda i: (not i[0][0], -i[0][1]))
    ]


def selection_score(scores: dict[str, float], baseline: dict[str, float], margin: float) -> float:
    """``train.clean_margin``'s rule: degraded box + point Dice when the clean-box Dice is
    at most ``margin`` below the baseline's (step 0), else -1 (never chosen)."""
    if scores.get("val_dice_clean", 0.0) < baseline.get("val_dice_clean", 0.0) - margin:
        return -1.0
    return scores.get("val_dice", 0.0) + scores.get("val_point_dice", 0.0)


def _teacher_masks(model, decoder, step_module, source, masks, scale) -> torch.Tensor:
    """``B x L x L`` bool masks of ``decoder`` (the starting one) from the tight boxes of
    ``masks`` on the images of ``source`` (clean variants)."""
    current = model.mask_decoder
    try:
        model.mask_decoder = decoder
        embedding, robust = step_module.image_features(source)
        boxes = boxes_from_masks(masks, np.random.default_rng(0), 0.0, scale).to(masks.device)
        logits, _, _ = decode_paired(model, embedding, robust, Prompts(None, None, boxes))
    finally:
        model.mask_decoder = current
    return logits > 0


def _open_shared_cache(folder: Path) -> EmbeddingCache:
    """The cache rank 0 built; InputError when this machine cannot see it."""
    try:
        return EmbeddingCache.open(folder)
    except FileNotFoundError:
        raise InputError(
            f"{folder}: rank 0 built the embedding cache but this process cannot read it; "
            "on several machines set [cache] dir (or --out) to a shared file system"
        ) from None


def _check_run_dir(run_dir: Path, config: TrainingConfig, resume: bool) -> None:
    """A new run needs an absent or empty folder; a resumed one the same config."""
    if resume:
        saved = run_dir / "config.toml"
        if not saved.is_file():
            raise InputError(
                f"{run_dir}: no run to resume (config.toml missing); start without --resume"
            )
        if TrainingConfig.from_toml(saved).to_dict() != config.to_dict():
            raise InputError(
                f"the config differs from the one {run_dir} was started with; resume with "
                f"{saved} or start a new run in another folder"
            )
        return
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise InputError(
            f"{run_dir} already exists and is not empty; use --resume or another --out"
        )


def train(
    config: TrainingConfig, run_dir: str | Path, options: RunOptions | None = None
) -> RunResult:
    """Train as ``config`` says into ``run_dir``; see the module docstring."""
    return Trainer(config, Path(run_dir), options or RunOptions()).run()
