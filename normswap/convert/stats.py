"""Streamed sufficient statistics and the closed-form per-channel least-squares fit.

For one replacement layer and one channel ``c`` the calibration regresses the original norm's
output ``y`` on the new norm's normalised output ``z`` (before its affine)::

    minimise_{gamma, beta}  sum (y - gamma * z - beta) ** 2

whose solution needs only the additive sums ``n, sum z, sum z^2, sum y, sum z*y`` (plus
``sum y^2`` for the residual).  All sums are float64 tensors of shape ``(C,)`` (or ``(K, C)`` for
K candidate group counts), so the statistics are bounded in memory, can be accumulated batch by
batch and all-reduced across ``torch.distributed`` ranks.

Per-sample normalisers (GroupNorm with any group count, InstanceNorm, channel LayerNorm, FRN) are
per-(sample, channel) affine maps ``z = (x - m[n, c]) * r[n, c]``, so their sums follow from the
per-(sample, channel) moments ``sum_p x, sum_p x^2, sum_p y, sum_p x*y`` over positions ``p``:
one pass over the activation gives the sums for *every* candidate group count at O(N*C) extra
cost each.  Dataset-statistic targets (BatchNorm, BGN, frozen affine) are at eval a per-channel
affine map of ``x`` whose statistics come from the same calibration sums, so the fit is done in
``x`` space and re-parametrised (an affine re-parametrisation does not change a least-squares fit).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fit_affine", "fit_scale", "sse_affine", "ConvSiteStats", "TokenSiteStats", "allreduce_stats"]


def fit_affine(n: Tensor, sz: Tensor, szz: Tensor, sy: Tensor, szy: Tensor,
               min_var: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Closed-form least squares ``y ~ gamma * z + beta`` per channel from streamed sums.

    A channel whose ``z`` is (numerically) constant gets ``gamma = 0`` and ``beta = mean(y)``;
    a channel without samples gets ``gamma = 1``, ``beta = 0``.
    """
    n = n.to(torch.float64)
    safe_n = n.clamp_min(1.0)
    mz, my = sz / safe_n, sy / safe_n
    var_z = (szz / safe_n - mz * mz)
    cov = (szy / safe_n - mz * my)
    scale = (szz / safe_n).abs().clamp_min(1e-300)
    ok = var_z > min_var * scale
    gamma = torch.where(ok, cov / torch.where(ok, var_z, torch.ones_like(var_z)), torch.zeros_like(cov))
    beta = my - gamma * mz
    empty = n <= 0
    gamma = torch.where(empty, torch.ones_like(gamma), gamma)
    beta = torch.where(empty, torch.zeros_like(beta), beta)
    return gamma, beta


def fit_scale(szz: Tensor, szy: Tensor) -> Tensor:
    """Least squares through the origin ``y ~ gamma * z`` (for RMSNorm, which has no bias)."""
    ok = szz > 0
    return torch.where(ok, szy / torch.where(ok, szz, torch.ones_like(szz)), torch.ones_like(szz))


def sse_affine(gamma: Tensor, beta: Tensor, n: Tensor, sz: Tensor, szz: Tensor, sy: Tensor,
               szy: Tensor, syy: Tensor) -> Tensor:
    """Residual sum of squares of ``gamma * z + beta`` against ``y`` per channel (clamped >= 0)."""
    n = n.to(torch.float64)
    sse = (syy - 2 * gamma * szy - 2 * beta * sy + gamma * gamma * szz + 2 * gamma * beta * sz
           + beta * beta * n)
    return sse.clamp_min(0.0)


def _zeros(*shape: int, device=None) -> Tensor:
    return torch.zeros(*shape, dtype=torch.float64, device=device)


def _row_moments(xr: Tensor, yr: Tensor) -> tuple[Tensor, ...]:
    """Per (sample, channel) row of ``(N, C, P)`` activations: the mean ``m`` of x, ``sum (x - m)^2``,
    ``sum (x - m) y``, ``sum y`` and ``sum y^2``.  Both x and y are centred on their row means
    first, so the row sums (batched dot products in the activation dtype: no float64 copy of the
    activations, one pass each) add no large nearly-equal terms; float64 takes over from there."""
    N, C, P = xr.shape
    m = xr.mean(2, keepdim=True)
    my = yr.mean(2, keepdim=True)
    xc = (xr - m).reshape(N * C, 1, P)
    yc = (yr - my).reshape(N * C, 1, P)
    q = torch.bmm(xc, xc.transpose(1, 2)).reshape(N, C).double()
    r_ = torch.bmm(xc, yc.transpose(1, 2)).reshape(N, C).double()
    qy = torch.bmm(yc, yc.transpose(1, 2)).reshape(N, C).double()
    my = my.reshape(N, C).double()
    return m.reshape(N, C), q, r_, P * my, qy + P * my * my


class ConvSiteStats:
    """Sums for one conv-layout site (channel dim 1 of an ``(N, C, *)`` activation).

    ``candidates``: for per-sample targets, the group counts to evaluate (``0`` = FRN, i.e. mean
    square over positions, no mean subtraction); empty for dataset-statistic targets.
    ``naive_direct``: also accumulate the error of the naive FRN (gamma=1, beta=0, tau=0, with
    its TLU) directly, as it is not a function of the sums.
    """

    def __init__(self, channels: int, candidates: list[int], eps: float, *, naive_direct: bool = False,
                 device=None) -> None:
        c = int(channels)
        self.channels = c
        self.candidates = list(candidates)
        self.eps = float(eps)
        self.naive_direct = naive_direct
        k = len(self.candidates)
        # x-space sums (per channel)
        self.n = _zeros(c, device=device)
        self.sx = _zeros(c, device=device)
        self.sxx = _zeros(c, device=device)
        self.sy = _zeros(c, device=device)
        self.syy = _zeros(c, device=device)
        self.sxy = _zeros(c, device=device)
        # z-space sums per candidate
        self.sz = _zeros(k, c, device=device)
        self.szz = _zeros(k, c, device=device)
        self.szy = _zeros(k, c, device=device)
        self.naive_sse = _zeros(c, device=device)
        self.ymin = torch.full((c,), float("inf"), dtype=torch.float64, device=device)
        self.ndim = 0.0
        self.calls = 0

    # additive state, in a fixed order (for all-reduce)
    def sum_tensors(self) -> list[Tensor]:
        return [self.n, self.sx, self.sxx, self.sy, self.syy, self.sxy, self.sz, self.szz, self.szy,
                self.naive_sse]

    def min_tensors(self) -> list[Tensor]:
        return [self.ymin]

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        """Add one batch.  Per (sample, channel) the moments are taken *centred* on that sample's
        channel means (:func:`_row_moments`), so no moment formula below subtracts large
        nearly-equal numbers."""
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"expected (N, {self.channels}, ...) activations, got {tuple(x.shape)}")
        self.calls += 1
        self.ndim = max(self.ndim, float(x.dim()))
        N, C = x.shape[0], x.shape[1]
        dev = self.n.device
        xr = x.detach().reshape(N, C, -1)
        yr = y.detach().reshape(N, C, -1).to(xr.dtype)
        P = xr.shape[2]
        if N * P == 0:
            return
        f64 = torch.float64
        m, q, r_, sy, syy = self._moments(xr, yr)
        if xr.dtype != f64 and not all(bool(torch.isfinite(t).all()) for t in (q, r_, syy)) \
                and bool(torch.isfinite(xr).all()) and bool(torch.isfinite(yr).all()):
            # finite activations whose squares overflow the activation dtype (e.g. float32 values
            # above ~1e19): the batch's moments again in float64, not a NaN fit of a finite layer
            xr, yr = xr.to(f64), yr.to(f64)
            m, q, r_, sy, syy = self._moments(xr, yr)
        self.n += N * P
        self.sx += (P * m).sum(0)
        self.sxx += (q + P * m * m).sum(0)
        self.sy += sy.sum(0)
        self.syy += syy.sum(0)
        self.sxy += (r_ + m * sy).sum(0)
        self.ymin = torch.minimum(self.ymin, yr.amin(dim=(0, 2)).to(dev, f64))
        for k, g in enumerate(self.candidates):
            mu, rs = self._norm_params(m, q, P, g)
            d = m - mu
            self.sz[k] += (rs * P * d).sum(0)
            self.szz[k] += (rs * rs * (q + P * d * d)).sum(0)
            self.szy[k] += (rs * (r_ + d * sy)).sum(0)
        if self.naive_direct:
            mu, rs = self._norm_params(m, q, P, 0)
            z = (xr * rs.unsqueeze(2).to(xr.dtype)).clamp_min(0.0)  # naive FRN: gamma=1, beta=0, TLU tau=0
            self.naive_sse += ((z - yr) ** 2).sum(2, dtype=f64).sum(0).to(dev)

    def _moments(self, xr: Tensor, yr: Tensor) -> tuple[Tensor, ...]:
        """:func:`_row_moments` of one batch, as float64 on the statistics' device."""
        return tuple(t.to(self.n.device, torch.float64) for t in _row_moments(xr, yr))

    def _norm_params(self, m: Tensor, q: Tensor, P: int, g: int) -> tuple[Tensor, Tensor]:
        """Per-(sample, channel) mean ``mu`` and inverse std ``r`` of the normaliser with ``g``
        groups (``g = 0``: FRN), from the per-(sample, channel) means ``m`` and centred sums ``q``."""
        N, C = m.shape
        if g == 0:  # FRN: no mean, mean square over positions
            nu2 = q / P + m * m
            return torch.zeros_like(m), torch.rsqrt(nu2 + self.eps)
        cg = C // g
        mg = m.view(N, g, cg).mean(2)
        dev = m.view(N, g, cg) - mg.unsqueeze(2)
        vg = (q.view(N, g, cg).sum(2) + P * (dev * dev).sum(2)) / (cg * P)
        rg = torch.rsqrt(vg + self.eps)
        return mg.repeat_interleave(cg, dim=1), rg.repeat_interleave(cg, dim=1)

    # ------------------------------------------------------------------ fits
    def fit_candidate(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """(gamma, beta, sse) per channel for per-sample candidate ``k``."""
        g, b = fit_affine(self.n, self.sz[k], self.szz[k], self.sy, self.szy[k])
        sse = sse_affine(g, b, self.n, self.sz[k], self.szz[k], self.sy, self.szy[k], self.syy)
        return g, b, sse

    def naive_candidate_sse(self, k: int) -> Tensor:
        one, zero = torch.ones_like(self.sy), torch.zeros_like(self.sy)
        return sse_affine(one, zero, self.n, self.sz[k], self.szz[k], self.sy, self.szy[k], self.syy)

    def fit_x(self) -> tuple[Tensor, Tensor, Tensor]:
        """(s, t, sse) of ``y ~ s * x + t`` per channel (dataset-statistic targets)."""
        s, t = fit_affine(self.n, self.sx, self.sxx, self.sy, self.sxy)
        sse = sse_affine(s, t, self.n, self.sx, self.sxx, self.sy, self.sxy, self.syy)
        return s, t, sse

    def naive_x_sse(self, k: float) -> Tensor:
        """sse of ``y ~ k * x`` (a fresh BatchNorm at eval computes x / sqrt(1 + eps))."""
        kk = torch.full_like(self.sy, k)
        return sse_affine(kk, torch.zeros_like(kk), self.n, self.sx, self.sxx, self.sy, self.sxy, self.syy)

    def x_moments(self) -> tuple[Tensor, Tensor]:
        """Per-channel mean and (biased) variance of x over the calibration data."""
        n = self.n.clamp_min(1.0)
        mean = self.sx / n
        return mean, (self.sxx / n - mean * mean).clamp_min(0.0)


class TokenSiteStats:
    """Sums for a token-layout site (features on the last dim); one normaliser (rms or ln)."""

    def __init__(self, dim: int, kind: str, eps: float, device=None) -> None:
        d = int(dim)
        self.channels = d
        self.kind = kind
        self.eps = float(eps)
        self.n = _zeros(d, device=device)
        self.sz = _zeros(d, device=device)
        self.szz = _zeros(d, device=device)
        self.sy = _zeros(d, device=device)
        self.syy = _zeros(d, device=device)
        self.szy = _zeros(d, device=device)
        self.ndim = 0.0
        self.calls = 0

    def sum_tensors(self) -> list[Tensor]:
        return [self.n, self.sz, self.szz, self.sy, self.syy, self.szy]

    def min_tensors(self) -> list[Tensor]:
        return []

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        if x.shape[-1] != self.channels:
            raise ValueError(f"expected (..., {self.channels}) activations, got {tuple(x.shape)}")
        self.calls += 1
        self.ndim = max(self.ndim, float(x.dim()))
        xd = x.detach().reshape(-1, self.channels).to(device=self.n.device, dtype=torch.float64)
        yd = y.detach().reshape(-1, self.channels).to(device=self.n.device, dtype=torch.float64)
        if self.kind == "rms":
            z = xd * torch.rsqrt((xd * xd).mean(1, keepdim=True) + self.eps)
        else:
            m = xd.mean(1, keepdim=True)
            v = ((xd - m) ** 2).mean(1, keepdim=True)
            z = (xd - m) * torch.rsqrt(v + self.eps)
        self.n += xd.shape[0]
        self.sz += z.sum(0)
        self.szz += (z * z).sum(0)
        self.sy += yd.sum(0)
        self.syy += (yd * yd).sum(0)
        self.szy += (z * yd).sum(0)

    def fit(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.kind == "rms":
            g = fit_scale(self.szz, self.szy)
            b = torch.zeros_like(g)
        else:
            g, b = fit_affine(self.n, self.sz, self.szz, self.sy, self.szy)
        return g, b, sse_affine(g, b, self.n, self.sz, self.szz, self.sy, self.szy, self.syy)

    def naive_sse(self) -> Tensor:
        one, zero = torch.ones_like(self.sy), torch.zeros_like(self.sy)
        return sse_affine(one, zero, self.n, self.sz, self.szz, self.sy, self.szy, self.syy)


def comm_device() -> torch.device:
    """Where tensors go for a torch.distributed collective: the current CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    if str(dist.get_backend()).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def allreduce_stats(stats: list) -> bool:
    """Sum (and min) every site's statistics across ``torch.distributed`` ranks, in place.

    Returns True when a reduction happened (a process group is initialised with > 1 rank).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return False
    comm_dev = comm_device()
    for getter, op in (("sum_tensors", dist.ReduceOp.SUM), ("min_tensors", dist.ReduceOp.MIN)):
        tensors = [t for s in stats for t in getattr(s, getter)()]
        if not tensors:
            continue
        flat = torch.cat([t.reshape(-1).to(comm_dev) for t in tensors])
        dist.all_reduce(flat, op=op)
        off = 0
        for t in tensors:
            k = t.numel()
            t.copy_(flat[off:off + k].view_as(t).to(t.device))
            off += k
    # ndim and call counts: max over ranks so every rank builds the same modules
    meta = torch.tensor([[s.ndim, float(s.calls)] for s in stats], dtype=torch.float64, device=comm_dev)
    dist.all_reduce(meta, op=dist.ReduceOp.MAX)
    for s, row in zip(stats, meta.tolist()):
        s.ndim, s.calls = row[0], int(row[1])
    return True
