"""Batch normalisation over the global batch when a step's batch is split over ranks.

RobustSAM's ``SelectiveConv`` has a BatchNorm2d: trained in train mode, it normalises
with the statistics of the batch it sees. Split over N processes, each would see
1/N of the batch, so N processes would train other weights than one. CUDA has
``nn.SyncBatchNorm``; it refuses CPU tensors, so for gloo ``GlobalBatchNorm2d`` sums
the per-channel count, sum and sum of squares over the ranks with torch's
all-reduce, differentiable (gradients flow back through the other ranks' statistics).
"""

from __future__ import annotations

import torch
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of the gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of every rank's batch together
    (input ``B x C x H x W``); in eval mode it is BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        count = torch.full((1,), float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
        local = torch.cat([count, x.sum((0, 2, 3)), (x * x).sum((0, 2, 3))])
        total = _AllReduceSum.apply(local)
        channels = x.shape[1]
        n = total[0]
        mean = total[1 : 1 + channels] / n
        var = (total[1 + channels :] / n - mean * mean).clamp(min=0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased.detach(), momentum)
        shape = (1, channels, 1, 1)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def synchronise_batch_norm(model: nn.Module, device_type: str) -> int:
    """Replace every BatchNorm2d in ``model`` (in place) by one that normalises over all
    ranks: ``nn.SyncBatchNorm`` on CUDA, ``GlobalBatchNorm2d`` otherwise. Parameters and
    buffers are the same tensors (names, ``requires_grad`` and the checkpoint layout
    unchanged). Returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.BatchNorm2d:
                continue
            kind = nn.SyncBatchNorm if device_type == "cuda" else GlobalBatchNorm2d
            new = kind(child.num_features, child.eps, child.momentum, child.affine,
                       child.track_running_stats)  # fmt: skip
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(parent, name, new)
            replaced += 1
    return replaced
