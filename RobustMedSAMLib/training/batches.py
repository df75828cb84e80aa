"""Which samples a step trains on: a function of (seed, step) and the rank's share only.

Every rank draws the same global batch of step s (epoch order, corrupted variants,
per-sample generators) and keeps its contiguous share, so N processes see what one
process sees and a run resumes with any number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.training.config import TrainingConfig


@dataclass
class StepBatch:
    """This rank's part of a step's global batch: train-set ``indices``, ``variants``
    (0 clean), the batch ``rng`` (same on every rank), one generator per sample,
    ``weight`` and ``align_weight`` (see ``TrainStep.forward``)."""

    indices: list[int]
    variants: list[int]
    rng: np.random.Generator
    sample_rngs: list[np.random.Generator]
    weight: float = 1.0
    align_weight: float = 1.0
    any_corrupted: bool = False


class BatchPlan:
    """The global batches of a run over ``train_indices`` (samples with a visible mask)."""

    def __init__(
        self, config: TrainingConfig, train_indices: list[int], world: int = 1, rank: int = 0
    ) -> None:
        self.config = config
        self.train_indices = train_indices
        self.world, self.rank = world, rank
        if config.train.batch_size > len(train_indices):
            raise InputError(
                f"train.batch_size = {config.train.batch_size} is more than the "
                f"{len(train_indices)} training samples (slices with a visible mask): "
                "lower it or add data"
            )
        self.steps_per_epoch = max(1, -(-len(train_indices) // config.train.batch_size))
        self._orders: dict[int, list[int]] = {}

    def batch_for(self, step: int) -> StepBatch:
        """This rank's share of step ``step``'s global batch."""
        train, corruption = self.config.train, self.config.corruption
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.train_indices), train.seed, epoch)}
        order, count = self._orders[epoch], len(self.train_indices)
        # the last batch of an epoch is filled from the epoch's start: every batch is full
        batch = [self.train_indices[order[(position * train.batch_size + j) % count]]
                 for j in range(train.batch_size)]  # fmt: skip
        rng = np.random.default_rng([train.seed, step, 1])
        variants = [
            0
            if corruption.variants == 0 or rng.random() < corruption.clean_fraction
            else int(rng.integers(1, corruption.variants + 1))
            for _ in batch
        ]
        mine = share(train.batch_size, self.world, self.rank)
        corrupted = sum(v > 0 for v in variants)
        return StepBatch(
            [batch[j] for j in mine],
            [variants[j] for j in mine],
            rng,
            [np.random.default_rng([train.seed, step, j, 2]) for j in mine],
            weight=len(mine) * self.world / train.batch_size,
            align_weight=sum(variants[j] > 0 for j in mine) * self.world / max(corrupted, 1),
            any_corrupted=corrupted > 0,
        )


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(count)`` for ``epoch`` (as torch's samplers shuffle)."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(count, generator=generator).tolist()


def share(batch: int, world: int, rank: int) -> range:
    """Positions of ``rank``'s contiguous share of a ``batch`` split over ``world``
    processes (sizes differ by at most one; earlier ranks take the extra ones)."""
    size, extra = divmod(batch, world)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))
