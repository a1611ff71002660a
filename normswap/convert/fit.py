"""Closed-form fits of the replacements from a site's calibration statistics, and the
replacements made without calibration data."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import NormswapError
from ..norms import NORMS
from . import kinds as K
from .sites import Site
from .stats import ConvSiteStats, TokenSiteStats

__all__ = ["make_stats", "fit_site", "build_new", "assign", "data_free", "fix_nonfinite", "rel"]

_DEFAULT_EPS = 1e-5


def rel(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else (0.0 if num <= 0 else float("inf"))


def source_eps(site: Site) -> float:
    """The eps of the site's original norm (the registry's answer; 1e-5 when it has none)."""
    eps = NORMS[site.kind].eps(site.orig)
    return _DEFAULT_EPS if eps is None else float(eps)


def _candidates(site: Site, to: str, groups) -> list[int]:
    spec = K.TARGETS[to]
    return spec.candidates(site.channels, groups, site.name) if spec.candidates is not None else []


def make_stats(site: Site, to: str, groups, device) -> Any:
    eps = source_eps(site)
    if site.layout == "token":
        return TokenSiteStats(site.channels, to, eps, device=device)
    spec = K.TARGETS[to]
    if spec.eps is not None:
        eps = spec.eps
    # FRN's naive replacement is its normalised output itself (no group statistics)
    return ConvSiteStats(site.channels, _candidates(site, to, groups), eps, naive_direct=(to == "frn"),
                         device=device)


def fit_site(site: Site, to: str, groups, first_pass: bool) -> dict:
    """Closed-form fit of one site from its stats; returns the fitted parameters (float64)."""
    st = site.stats
    den = float(st.syy.sum())
    c = site.channels
    if site.layout == "token":
        g, b, sse = st.fit()
        if first_pass:
            site.err_naive = rel(float(st.naive_sse().sum()), den)
        site.err_fitted = rel(float(sse.sum()), den)
        return {"weight": g, "bias": b}
    spec = K.TARGETS[to]
    if spec.statistics == "sample":
        return _fit_per_sample(site, to, groups, first_pass, den)
    # dataset-statistic targets: fit y ~ s x + t, then re-parametrise
    s, t, sse = st.fit_x()
    eps = source_eps(site)
    if first_pass:
        kk = 1.0 if to == "affine" else 1.0 / math.sqrt(1.0 + eps)
        site.err_naive = rel(float(st.naive_x_sse(kk).sum()), den)
    site.err_fitted = rel(float(sse.sum()), den)
    if to == "affine":
        # a source whose eval form is a per-channel affine (BatchNorm & co.) is copied exactly: a least-squares
        # fit can only be worse (a channel constant on the calibration data, e.g. a ReLU6 clipped everywhere,
        # gets slope 0 and is wrong on other data); the fit is for sources with no such closed form
        exact = NORMS[site.kind].eval_affine(site.orig) if site.kind in NORMS else "unknown kind"
        if not isinstance(exact, str) and exact[0].numel() == c:
            site.err_fitted = 0.0
            site.exact = True
            return {"weight": exact[0], "bias": exact[1]}
        return {"weight": s, "bias": t}
    mean, var = st.x_moments()
    if to == "bn":
        sd = torch.sqrt(var + eps)
        return {"weight": s * sd, "bias": s * mean + t, "running_mean": mean, "running_var": var}
    if to == "bgn":
        G = site.groups or (K.naive_groups(c) if groups == "auto" else int(groups))
        if c % G:
            raise NormswapError(f"--groups {G} does not divide the {c} channels of {site.name}")
        site.groups = G
        n = st.n.view(G, -1).sum(1).clamp_min(1.0)
        mg = st.sx.view(G, -1).sum(1) / n
        vg = (st.sxx.view(G, -1).sum(1) / n - mg * mg).clamp_min(0.0)
        cg = c // G
        m_c, sd_c = mg.repeat_interleave(cg), torch.sqrt(vg + eps).repeat_interleave(cg)
        return {"weight": s * sd_c, "bias": s * m_c + t, "running_mean": mg, "running_var": vg}
    raise NormswapError(f"unknown target {to!r}")  # pragma: no cover


def _fit_per_sample(site: Site, to: str, groups, first_pass: bool, den: float) -> dict:
    st = site.stats
    c = site.channels
    if to == "gn" and groups == "auto":
        errs = {}
        best = None
        for k, gcount in enumerate(st.candidates):
            _, _, sse = st.fit_candidate(k)
            e = rel(float(sse.sum()), den)
            errs[gcount] = e
            if best is None or e < errs[st.candidates[best]] * (1 - 1e-9):
                best = k
        site.group_errors = errs
        k = best
    else:
        k = 0
    gcount = st.candidates[k]
    gamma, beta, sse = st.fit_candidate(k)
    site.groups = {"gn": gcount, "ln": 1}.get(to)
    if first_pass:
        if to == "frn":
            site.err_naive = rel(float(st.naive_sse.sum()), den)
        else:
            nk = st.candidates.index(K.naive_groups(c)) if to == "gn" else 0
            site.err_naive = rel(float(st.naive_candidate_sse(nk).sum()), den)
    site.err_fitted = rel(float(sse.sum()), den)
    out = {"weight": gamma, "bias": beta}
    if to == "frn":
        ymin = st.ymin.clone()
        out["tau"] = torch.where(torch.isfinite(ymin), ymin, beta - 6 * gamma.abs())
    return out


def build_new(site: Site, to: str, ndim: int, device, dtype) -> nn.Module:
    new = K.TARGETS[to].build(site.layout, site.channels, ndim, groups=site.groups, eps=source_eps(site),
                              name=site.name)
    return new.to(device=device, dtype=dtype).eval()


def assign(new: nn.Module, params: dict) -> None:
    with torch.no_grad():
        for key, val in params.items():
            t = getattr(new, key, None)
            if t is None:
                continue
            t.copy_(val.to(device=t.device, dtype=t.dtype).view_as(t))


def data_free(site: Site, to: str, groups, ndim: int, device, dtype) -> nn.Module:
    """Replacement without calibration data: exact where a closed form exists, else copy gamma/beta."""
    src = site.orig
    c = site.channels
    spec = K.TARGETS[to]
    if site.layout == "conv" and spec.grouped:
        site.groups = K.naive_groups(c) if groups == "auto" else int(groups)
        if c % site.groups:
            raise NormswapError(f"--groups {site.groups} does not divide the {c} channels of {site.name}")
    elif to == "ln" and site.layout == "conv":
        site.groups = 1
    new = build_new(site, to, ndim, device, dtype)
    w = getattr(src, "weight", None)
    b = getattr(src, "bias", None)
    w = w.detach().double() if isinstance(w, Tensor) and w.numel() == c else None
    b = b.detach().double() if isinstance(b, Tensor) and b.numel() == c else None
    if to == "affine":
        exact = NORMS[site.kind].eval_affine(src)  # (scale, shift) float64, or why there is none
        if not isinstance(exact, str) and exact[0].numel() == c:
            _assign_exact(new, exact)
            site.method = "exact"
            site.err_fitted = 0.0
            return new
    params = {}
    if w is not None:
        params["weight"] = w
    if b is not None:
        params["bias"] = b
    if to == "frn":
        gw = w if w is not None else torch.ones(c, dtype=torch.float64)
        gb = b if b is not None else torch.zeros(c, dtype=torch.float64)
        params["tau"] = gb - 6 * gw.abs()
    assign(new, params)
    site.method = "copied" if params else "fresh"
    return new


def _assign_exact(new: nn.Module, scale_shift) -> None:
    scale, shift = scale_shift
    assign(new, {"weight": scale, "bias": shift})


def fix_nonfinite(site: Site, params: dict) -> None:
    """Channels whose fit is not finite (the original norm produced NaN/Inf there) keep the source's
    gamma/beta (or 1/0); the layer gets a note."""
    bad = torch.zeros(site.channels, dtype=torch.bool)
    for key in ("weight", "bias", "tau"):
        v = params.get(key)
        if v is not None and v.numel() == site.channels:
            bad |= ~torch.isfinite(v.cpu())
    if not bool(bad.any()):
        return
    src_w = getattr(site.orig, "weight", None)
    src_b = getattr(site.orig, "bias", None)
    for key, src, default in (("weight", src_w, 1.0), ("bias", src_b, 0.0), ("tau", None, -1e4)):
        v = params.get(key)
        if v is None or v.numel() != site.channels:
            continue
        fb = torch.full_like(v, default)
        if isinstance(src, Tensor) and src.numel() == site.channels:
            sv = src.detach().to(v)
            fb = torch.where(torch.isfinite(sv), sv, fb)
        params[key] = torch.where(bad.to(v.device), fb, v)
    for key in ("running_mean", "running_var"):
        v = params.get(key)
        if v is not None:
            params[key] = torch.where(torch.isfinite(v), v, torch.zeros_like(v) if key == "running_mean"
                                      else torch.ones_like(v))
    idx = bad.nonzero().flatten().tolist()
    site.note = (f"the original output is not finite in channel(s) {idx[:8]}{'...' if len(idx) > 8 else ''}; "
                 "those keep the source gamma/beta")
