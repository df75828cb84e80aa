"""The distributed plumbing of a fine-tuning run (``torchrun``, ``WORLD_SIZE`` > 1).

One ``RankGroup`` per run: it wraps the training step in DDP (BatchNorm synchronised over
the global batch), makes ranks agree on a stop, waits at barriers (a long one while rank 0
builds the embedding cache) and averages the loss terms over ranks. With one process
every call is a no-op.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from RobustMedSAMLib import distributed
from RobustMedSAMLib.distributed import DistInfo
from RobustMedSAMLib.training.losses import LOSS_TERMS

log = logging.getLogger(__name__)


class RankGroup:
    """This process's place in the run's process group."""

    def __init__(self, dist: DistInfo, device: torch.device) -> None:
        self.dist = dist
        self.device = device
        self.own_group = False
        self.wait_group = None

    def wrap(self, step_module: nn.Module, model: nn.Module) -> nn.Module:
        """``step_module`` as DDP when there are several processes (else unchanged)."""
        if self.dist.world <= 1:
            return step_module
        import torch.distributed as torch_dist

        from RobustMedSAMLib.training.sync_batchnorm import synchronise_batch_norm

        self.own_group = not (torch_dist.is_available() and torch_dist.is_initialized())
        distributed.init_process_group(self.device.type, required=True)
        if synchronise_batch_norm(model, self.device.type):
            log.info("BatchNorm statistics are taken over the global batch (all ranks)")
        # rank 0 may build the embedding cache for hours: the others wait on this group
        self.wait_group = distributed.long_wait_group()
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            step_module, device_ids=ids, find_unused_parameters=True
        )

    def agree(self, flag: bool) -> bool:
        """True on every rank when any rank says so (a signal may reach ranks a step apart)."""
        if self.dist.world <= 1:
            return flag
        import torch.distributed as torch_dist

        value = torch.tensor([float(flag)], device=self.device)
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self, long: bool = False) -> None:
        """Wait for every rank; ``long``: on the group whose timeout allows hours."""
        if self.dist.world > 1:
            distributed.barrier(self.wait_group if long else None)

    def mean_over_ranks(self, total: float, terms: dict[str, float]) -> tuple[float, dict]:
        """The global batch's loss and terms from every rank's weighted share."""
        if self.dist.world <= 1:
            return total, terms
        import torch.distributed as torch_dist

        names = LOSS_TERMS  # a rank may lack a term (align when its share is all clean)
        values = [total] + [terms.get(n, 0.0) for n in names] + [float(n in terms) for n in names]
        value = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(value)
        value = (value / self.dist.world).tolist()
        present = value[1 + len(names) :]
        out = {n: v for n, v, p in zip(names, value[1 : 1 + len(names)], present, strict=True) if p}
        return value[0], out

    def close(self) -> None:
        """Destroy the process group when this run created it."""
        if self.own_group:
            distributed.destroy_process_group()
