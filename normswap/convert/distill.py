"""A short distillation of the converted model towards the original on the unlabeled
calibration inputs (KL on logits for classifiers, relative MSE otherwise)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset
from .fidelity import dist_info, first_tensor

__all__ = ["distill"]


def distill(work: nn.Module, original: nn.Module, data: Dataset, steps: int, batch_size: int, to_dev,
             cache, classifier: bool, progress, lr: float = 3e-4, only=None,
             mix: bool = False) -> tuple[float, float]:
    """Distil the converted model towards the original on the calibration inputs (eval-mode norms).

    Trains every trainable parameter with Adam; eval mode keeps running statistics fixed.
    Under torch.distributed the gradients are averaged across ranks.
    """
    t0 = time.perf_counter()
    src = work.parameters() if only is None else [p for m in only for p in m.parameters()]
    params = [p for p in src if p.requires_grad]
    if not params:
        return float("nan"), 0.0
    targets = torch.cat(cache) if cache is not None else None
    opt = _Adam(params, lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    n = len(data)
    dist_on, world = dist_info()
    work.eval()
    loss_val = float("nan")
    ema = None
    perm = torch.randperm(n, generator=g)
    pos = 0
    for step in range(steps):
        if pos + min(batch_size, n) > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        xb = to_dev(data.inputs[idx])
        if mix and xb.is_floating_point() and xb.shape[0] > 1:
            lam = torch.rand((xb.shape[0],) + (1,) * (xb.dim() - 1), generator=g).to(xb)
            xb = lam * xb + (1 - lam) * xb.roll(1, 0)
            with torch.no_grad():
                ref = first_tensor(original(xb)).float()
        else:
          with torch.no_grad():
            ref = targets[idx].to(xb.device).float() if targets is not None else first_tensor(original(xb)).float()
        out = first_tensor(work(xb)).float()
        if classifier:
            loss = F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean")
        else:
            loss = ((out - ref) ** 2).mean() / (ref ** 2).mean().clamp_min(1e-12)
        for p in params:
            p.grad = None
        loss.backward()
        if dist_on:
            import torch.distributed as dist
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        loss_val = float(loss.detach())
        ema = loss_val if ema is None else 0.9 * ema + 0.1 * loss_val
        if progress is not None:
            progress("distill", step + 1, steps, loss_val)
    work.zero_grad(set_to_none=True)
    return loss_val, time.perf_counter() - t0


class _Adam:
    """Adam with a cosine learning-rate decay, written out so that distillation does not import
    torch.optim (whose first use imports torch._dynamo: seconds of start-up)."""

    def __init__(self, params: list, lr: float, total_steps: int, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = params
        self.lr, self.total = lr, max(1, int(total_steps))
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        lr = self.lr * 0.5 * (1 + math.cos(math.pi * self.t / self.total))
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            p.addcdiv_(m / c1, (v / c2).sqrt_().add_(self.eps), value=-lr)
