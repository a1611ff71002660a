"""`convert()`: replace norm layers and calibrate the replacements.

How it works
------------
1. The model is deep-copied and put in eval mode.  Every selected norm module is replaced *in its
   parent* (``parent._modules[name]``) by a calibration wrapper holding the original norm and its
   replacement, so user module classes and names are kept and no FX tracing is needed.  At the
   end the wrappers are swapped for the replacements.
2. Calibration passes stream the calibration inputs through the working model.  At each site the
   wrapper computes ``y = original_norm(x)`` on the input ``x`` that arrives there and adds the
   sufficient statistics of the regression of ``y`` on the replacement's normalised output
   (see :mod:`normswap.convert.stats`); after the pass every replacement is fitted in closed form
   (running statistics where the target has them, then per-channel gamma/beta; the group count
   when ``groups="auto"``).

   * ``mode="fast"``: one pass in which every wrapper passes ``y`` on, i.e. the working model
     computes exactly the original model; each layer is fitted on the original activations.
   * ``mode="sequential"`` (default): pass 1 is the fast pass.  In pass 2 every batch is run
     twice: first through the original norms (recording each site's original activation
     ``y_orig``), then with every wrapper passing the *replacement's* output on (with the pass-1
     fit), so each layer sees the input ``x_conv`` produced by the already-converted layers before
     it and is refitted so that ``new(x_conv)`` matches ``y_orig``: a layer also corrects the error
     its predecessors left, so errors do not compound.  Layer k's pass-2 statistics depend on the
     pass-1 fits of the layers before it rather than their final fits; the difference is second
     order, and on the digits ResNet a third pass (or one pass per layer) changed nothing
     measurable, so two passes are used (~5x one forward pass: 1 + 2 forwards plus statistics).
     The variant suggested in REFERENCE.md (target ``original_norm(x_conv)``, one forward per pass)
     is kept as ``_target="norm"``; on the digits ResNet it was equal for gn/ln and worse for
     in/frn (BN->FRN 86% vs 94% test accuracy, BN->IN 17% vs 25%), hence the default.
3. One plain forward pass of the converted model over the calibration inputs measures fidelity
   (top-1 agreement / KL for classifiers, relative output error otherwise; accuracy with labels)
   against the original outputs cached during pass 1.
4. ``distill_steps > 0``: short distillation against the original (KL on logits for classifiers,
   relative MSE otherwise) on the unlabeled calibration inputs, then fidelity again.

Under ``torch.distributed`` (e.g. torchrun) every statistic is all-reduced before each fit (and
the fidelity sums and distillation gradients too), so every rank gets the model a single process
would get from the union of the ranks' calibration data.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NormswapError
from . import kinds as K
from .report import ConvertReport, Fidelity, LayerFit
from .stats import ConvSiteStats, TokenSiteStats, allreduce_stats

__all__ = ["convert"]

MODES = ("fast", "sequential")
_CACHE_LIMIT_BYTES = 512 * 2**20


# ================================================================================ wrapper / sites

class _CalibSite(nn.Module):
    """Stand-in for one norm during calibration (replaced by the fitted module at the end)."""

    def __init__(self, orig: nn.Module) -> None:
        super().__init__()
        self.orig = orig
        self.new: nn.Module | None = None
        object.__setattr__(self, "stats", None)
        object.__setattr__(self, "collect", False)
        object.__setattr__(self, "use_new", False)
        object.__setattr__(self, "shape_seen", None)
        object.__setattr__(self, "recording", False)
        object.__setattr__(self, "recorded", [])

    def forward(self, x, *args, **kwargs):
        if args or kwargs:
            raise NormswapError(
                f"norm layer {type(self.orig).__name__} is called with extra arguments; only norms "
                "called as norm(x) can be converted (use --from to pick other layers)")
        if self.shape_seen is None:
            object.__setattr__(self, "shape_seen", tuple(x.shape))
        if self.recording:
            y = self.orig(x)
            self.recorded.append(y)
        elif self.collect and self.stats is not None:
            rec = self.recorded.pop(0) if self.recorded else None
            if rec is not None and rec.shape == x.shape:
                y = rec  # the original model's activation here (error-correcting target)
            else:
                y = self.orig(x)
            self.stats.update(x, y)
        elif self.use_new and self.new is not None:
            return self.new(x)
        else:
            y = self.orig(x)
        if self.use_new and self.new is not None:
            return self.new(x)
        return y


class _Site:
    def __init__(self, name: str, kind: str, module: nn.Module, layout: str) -> None:
        self.name = name
        self.kind = kind
        self.orig = module
        self.layout = layout
        self.channels = _channels_of(module)
        self.wrapper = _CalibSite(module)
        self.stats = None
        self.groups: int | None = None
        self.err_naive: float | None = None
        self.err_fitted: float | None = None
        self.group_errors: dict | None = None
        self.method = "fitted"
        self.note: str | None = None
        self.calibrated = False


def _channels_of(m: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        v = getattr(m, attr, None)
        if isinstance(v, int):
            return v
    shape = getattr(m, "normalized_shape", None)
    if shape is not None:
        return int(tuple(shape)[-1])
    w = getattr(m, "weight", None)
    if isinstance(w, Tensor) and w.dim() >= 1:
        return int(w.shape[0])
    raise NormswapError(f"cannot tell the channel count of {type(m).__name__}")


def _param_like(m: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device, torch.float32
    return torch.device("cpu"), torch.float32


def _replace_in_parents(model: nn.Module, mapping: dict[int, nn.Module]) -> int:
    """Replace every child slot holding a module whose id is in ``mapping``; returns slots changed."""
    changed = 0
    for parent in list(model.modules()):
        if isinstance(parent, _CalibSite):
            continue
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in mapping:
                parent._modules[key] = mapping[id(child)]
                changed += 1
    return changed


# ================================================================================ data

class _Calib:
    def __init__(self, inputs: Tensor, labels: Tensor | None, source: str) -> None:
        self.inputs = inputs
        self.labels = labels
        self.source = source

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def batches(self, batch_size: int):
        n = len(self)
        for i in range(0, n, batch_size):
            yield self.inputs[i:i + batch_size], (None if self.labels is None else self.labels[i:i + batch_size])


def _first_layer(model: nn.Module) -> nn.Module | None:
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding,
                          nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            return m
    return None


def expected_input_text(model: nn.Module) -> str:
    m = _first_layer(model)
    if m is None:
        return "unknown (no Conv/Linear/Embedding layer found)"
    if isinstance(m, nn.Embedding):
        return f"integer token ids (N, L) < {m.num_embeddings} (first layer {m})"
    if isinstance(m, nn.Linear):
        return f"(N, ..., {m.in_features}) (first layer {m})"
    nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2,
          nn.ConvTranspose3d: 3}[type(m)]
    spatial = {1: "L", 2: "H, W", 3: "D, H, W"}[nd]
    return f"(N, {m.in_channels}, {spatial}) (first layer {type(m).__name__}({m.in_channels}, {m.out_channels}, ...))"


def _guess_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    try:
        from ..data import example_inputs
        ex = example_inputs(model)
        if ex and isinstance(ex[0], Tensor):
            return tuple(ex[0].shape[1:])
    except Exception:
        pass
    m = _first_layer(model)
    if isinstance(m, nn.Conv2d):
        return (m.in_channels, 32, 32)
    if isinstance(m, nn.Conv1d):
        return (m.in_channels, 64)
    if isinstance(m, nn.Linear):
        return (m.in_features,)
    return None


def _fallback_load(spec, limit):
    """Minimal loader used only when normswap.data is unavailable."""
    import numpy as np
    from pathlib import Path

    labels = None
    source = type(spec).__name__
    if isinstance(spec, (str, Path)):
        p = Path(spec)
        source = str(p)
        if not p.exists():
            raise NormswapError(f"calibration data {p} not found")
        if p.suffix == ".npz":
            with np.load(p) as z:
                keys = list(z.keys())
                xk = next((k for k in ("x", "inputs", "X", "data") if k in keys), keys[0])
                yk = next((k for k in ("y", "labels", "Y", "targets") if k in keys), None)
                x = torch.from_numpy(z[xk])
                labels = torch.from_numpy(z[yk]) if yk else None
        elif p.suffix == ".npy":
            x = torch.from_numpy(np.load(p))
        elif p.suffix == ".pt":
            obj = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                x = next(obj[k] for k in ("x", "inputs", "X", "data") if k in obj)
                labels = next((obj[k] for k in ("y", "labels", "Y", "targets") if k in obj), None)
            elif isinstance(obj, (tuple, list)):
                x, labels = obj[0], (obj[1] if len(obj) > 1 else None)
            else:
                x = obj
        else:
            raise NormswapError(f"unsupported calibration file {p} (use .npz, .npy or .pt)")
    elif isinstance(spec, Tensor):
        x = spec
    elif hasattr(spec, "__array__") and not isinstance(spec, (list, tuple)):
        x = torch.as_tensor(np.asarray(spec))
    else:
        xs, ys = [], []
        for b in spec:
            if isinstance(b, (tuple, list)):
                xs.append(torch.as_tensor(b[0]))
                if len(b) > 1 and b[1] is not None:
                    ys.append(torch.as_tensor(b[1]))
            elif isinstance(b, dict):
                xs.append(torch.as_tensor(next(b[k] for k in ("x", "inputs", "input") if k in b)))
            else:
                xs.append(torch.as_tensor(b))
        if not xs:
            raise NormswapError("calibration data is empty")
        x = torch.cat([t if t.dim() > 0 else t.reshape(1) for t in xs])
        labels = torch.cat(ys) if len(ys) == len(xs) else None
        source = "iterable"
    if x.is_floating_point():
        x = x.float()
    if limit is not None:
        x = x[:limit]
        labels = None if labels is None else labels[:limit]
    return _Calib(x, labels, source)


def _warn_random(report: ConvertReport, shape) -> None:
    msg = (f"calibrating on random inputs of shape {shape}: the fit matches the norms on noise, not on "
           "real activations; pass real calibration data for a faithful conversion")
    warnings.warn(msg, stacklevel=4)
    report.warnings.append(msg)


def _load_calib(calib, model: nn.Module, calib_samples: int | None, report: ConvertReport) -> _Calib | None:
    if calib is None:
        return None
    # a normswap.data.Dataset or anything with .inputs
    if hasattr(calib, "inputs") and isinstance(getattr(calib, "inputs"), Tensor):
        x, y = calib.inputs, getattr(calib, "labels", None)
        if getattr(calib, "synthetic", False):
            _warn_random(report, tuple(x.shape[1:]))
        if calib_samples is not None:
            x = x[:calib_samples]
            y = None if y is None else y[:calib_samples]
        return _Calib(x, y, str(getattr(calib, "source", "dataset")))
    if isinstance(calib, str) and calib == "random":
        shape = _guess_input_shape(model)
        if shape is None:
            raise NormswapError("calib='random' needs to know the input shape; pass a tensor "
                                "(or on the command line --calib FILE)")
        _warn_random(report, tuple(shape))
        n = calib_samples or 256
        try:
            from ..data import load_data
            ds = load_data("random", limit=n, input_shape=(n,) + tuple(shape), seed=0)
            x = ds.inputs[:n]
        except Exception:
            g = torch.Generator().manual_seed(0)
            x = torch.randn((n,) + tuple(shape), generator=g)
        return _Calib(x, None, "random")
    try:
        from ..data import load_data
    except Exception:
        load_data = None
    if load_data is not None:
        ds = load_data(calib, limit=calib_samples)
        return _Calib(ds.inputs, ds.labels, str(getattr(ds, "source", "data")))
    return _fallback_load(calib, calib_samples)


# ================================================================================ helpers

def _first_tensor(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        for k in ("logits", "out", "output"):
            if isinstance(out.get(k), Tensor):
                return out[k]
        for v in out.values():
            if isinstance(v, Tensor):
                return v
    if hasattr(out, "logits") and isinstance(out.logits, Tensor):
        return out.logits
    if isinstance(out, (tuple, list)):
        for v in out:
            try:
                return _first_tensor(v)
            except NormswapError:
                pass
    raise NormswapError(f"cannot find a tensor in the model output of type {type(out).__name__}")


def _is_classifier(out: Tensor) -> bool:
    return out.dim() == 2 and out.shape[1] > 1 and out.is_floating_point()


def _dist_info() -> tuple[bool, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1, dist.get_world_size()
    return False, 1


def _allreduce_floats(values: list[float]) -> list[float]:
    on, _ = _dist_info()
    if not on:
        return values
    import torch.distributed as dist
    dev = torch.device("cuda", torch.cuda.current_device()) if str(dist.get_backend()) == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


@contextmanager
def _eval_mode(m: nn.Module):
    flags = [(mod, mod.training) for mod in m.modules()]
    m.eval()
    try:
        yield m
    finally:
        for mod, flag in flags:
            mod.training = flag


def _rel(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else (0.0 if num <= 0 else float("inf"))


# ================================================================================ fitting

def _candidates(site: _Site, to: str, groups) -> list[int]:
    c = site.channels
    if to == "gn":
        if groups == "auto":
            return K.divisors(c)
        g = int(groups)
        if c % g:
            raise NormswapError(f"--groups {g} does not divide the {c} channels of {site.name}; "
                                f"divisors: {', '.join(map(str, K.divisors(c)))} (or use auto)")
        cands = [g]
        if K.naive_groups(c) != g:
            cands.append(K.naive_groups(c))  # for the naive error
        return cands
    if to == "ln":
        return [1]
    if to == "in":
        return [c]
    if to == "frn":
        return [0]
    return []


def _make_stats(site: _Site, to: str, groups, device) -> Any:
    eps = K.source_eps(site.orig)
    if site.layout == "token":
        return TokenSiteStats(site.channels, "rms" if to == "rms" else "ln", eps, device=device)
    if to == "frn":
        eps = 1e-6
    return ConvSiteStats(site.channels, _candidates(site, to, groups), eps, naive_direct=(to == "frn"),
                         device=device)


def _fit_site(site: _Site, to: str, groups, first_pass: bool) -> dict:
    """Closed-form fit of one site from its stats; returns the fitted parameters (float64)."""
    st = site.stats
    den = float(st.syy.sum())
    c = site.channels
    if site.layout == "token":
        g, b, sse = st.fit()
        if first_pass:
            site.err_naive = _rel(float(st.naive_sse().sum()), den)
        site.err_fitted = _rel(float(sse.sum()), den)
        return {"weight": g, "bias": b}
    if to in K.PER_SAMPLE_TARGETS:
        if to == "gn" and groups == "auto":
            errs = {}
            best = None
            for k, gcount in enumerate(st.candidates):
                _, _, sse = st.fit_candidate(k)
                e = _rel(float(sse.sum()), den)
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
                site.err_naive = _rel(float(st.naive_sse.sum()), den)
            else:
                nk = st.candidates.index(K.naive_groups(c)) if to == "gn" else 0
                site.err_naive = _rel(float(st.naive_candidate_sse(nk).sum()), den)
        site.err_fitted = _rel(float(sse.sum()), den)
        out = {"weight": gamma, "bias": beta}
        if to == "frn":
            ymin = st.ymin.clone()
            out["tau"] = torch.where(torch.isfinite(ymin), ymin, beta - 6 * gamma.abs())
        return out
    # dataset-statistic targets: fit y ~ s x + t, then re-parametrise
    s, t, sse = st.fit_x()
    eps = K.source_eps(site.orig)
    if first_pass:
        kk = 1.0 if to == "affine" else 1.0 / math.sqrt(1.0 + eps)
        site.err_naive = _rel(float(st.naive_x_sse(kk).sum()), den)
    site.err_fitted = _rel(float(sse.sum()), den)
    if to == "affine":
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


def _build_new(site: _Site, to: str, ndim: int, device, dtype) -> nn.Module:
    eps = K.source_eps(site.orig)
    if site.layout == "token":
        new = K.build_token_target(to, site.channels, eps)
    else:
        new = K.build_target(to, site.channels, ndim, groups=site.groups, eps=eps, name=site.name)
    return new.to(device=device, dtype=dtype).eval()


def _assign(new: nn.Module, params: dict) -> None:
    with torch.no_grad():
        for key, val in params.items():
            t = getattr(new, key, None)
            if t is None:
                continue
            t.copy_(val.to(device=t.device, dtype=t.dtype).view_as(t))


def _data_free(site: _Site, to: str, groups, ndim: int, device, dtype) -> nn.Module:
    """Replacement without calibration data: exact where a closed form exists, else copy gamma/beta."""
    src = site.orig
    c = site.channels
    if site.layout == "conv" and to in ("gn", "bgn"):
        site.groups = K.naive_groups(c) if groups == "auto" else int(groups)
        if c % site.groups:
            raise NormswapError(f"--groups {site.groups} does not divide the {c} channels of {site.name}")
    elif to == "ln" and site.layout == "conv":
        site.groups = 1
    new = _build_new(site, to, ndim, device, dtype)
    w = getattr(src, "weight", None)
    b = getattr(src, "bias", None)
    w = w.detach().double() if isinstance(w, Tensor) and w.numel() == c else None
    b = b.detach().double() if isinstance(b, Tensor) and b.numel() == c else None
    rm, rv = getattr(src, "running_mean", None), getattr(src, "running_var", None)
    if (to == "affine" and site.kind in ("bn", "frozen_bn") and isinstance(rm, Tensor) and isinstance(rv, Tensor)
            and rm.numel() == c):
        eps = K.source_eps(src)
        scale = (w if w is not None else torch.ones(c, dtype=torch.float64)) / torch.sqrt(rv.double() + eps)
        shift = (b if b is not None else torch.zeros(c, dtype=torch.float64)) - rm.double() * scale
        _assign(new, {"weight": scale, "bias": shift})
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
    _assign(new, params)
    site.method = "copied" if params else "fresh"
    return new


# ================================================================================ main entry

def _resolve_sources(to: str, source) -> tuple[str, ...]:
    if source is None:
        return K.default_sources(to)
    if isinstance(source, str):
        items = [s.strip() for s in source.split(",") if s.strip()]
    else:
        items = [str(s) for s in source]
    if not items:
        raise NormswapError("--from needs at least one norm kind")
    known = set(K.CONV_SOURCES) | set(K.TOKEN_SOURCES) | {"cbn", "sabn", "custom", "unsupported_subclass"}
    for s in items:
        if s not in known:
            raise NormswapError(f"unknown --from kind {s!r}; known kinds: "
                                f"{', '.join(K.CONV_SOURCES + K.TOKEN_SOURCES)}")
        K.check_pair(s, to)
    return tuple(items)


def convert(model, to: str = "gn", calib=None, *, source=None, groups="auto", mode: str = "sequential",
            distill_steps: int = 0, batch_size: int = 64, calib_samples: int | None = None,
            progress: Callable | None = None, _passes: int | None = None,
            _target: str = "model", _distill_lr: float = 3e-4, _distill_params: str = "all",
            _distill_mix: bool = False) -> tuple[nn.Module, ConvertReport]:
    """Replace norm layers by ``to`` and fit the replacements on calibration data.

    Parameters
    ----------
    model: an ``nn.Module`` (or a ``normswap.io.LoadedModel``); it is not modified.
    to: target kind: gn, in, ln, bn, bgn, frn, affine (conv feature maps) or rms (token models;
        ``ln`` also works for token models).
    calib: calibration inputs: a tensor / ndarray, an iterable of tensors or of (inputs, labels)
        batches (e.g. a DataLoader), a ``normswap.data.Dataset``, a path as accepted by
        ``normswap.data.load_data``, or ``"random"`` (with a warning).  ``None``: no calibration
        (exact closed forms where they exist, else the source's gamma/beta are copied); the report
        is marked uncalibrated.
    source: norm kind(s) to convert (str, comma-separated str or list); default every BatchNorm
        (for ``to="bn"`` every other conv-layout norm, for ``to="rms"`` every LayerNorm).
    groups: ``"auto"`` (GroupNorm: the divisor of C with the least calibration reconstruction error)
        or an int.
    mode: ``"sequential"`` (default) or ``"fast"``; see the module docstring.
    distill_steps: steps of distillation against the original after calibration.
    progress: optional callable ``progress(stage, step, total, loss)`` with stage "calibrate"
        (per pass) or "distill" (per step; loss is the current loss).

    Private knobs (for benchmarks and experiments, not a stable API): ``_passes`` (number of
    calibration passes), ``_target`` ("model": fit to the original model's activation, default;
    "norm": fit to original_norm(x_converted)), ``_distill_lr`` (3e-4), ``_distill_params``
    ("all" or "norms": only the replacement layers), ``_distill_mix`` (mixup of calibration inputs).

    Returns ``(converted_model, ConvertReport)``.
    """
    to = str(to).lower()
    if to not in K.TARGETS:
        raise NormswapError(f"unknown target {to!r}; choose one of {', '.join(K.TARGETS)} "
                            f"(valid pairs: {K.valid_pairs_text()})")
    if mode not in MODES:
        raise NormswapError(f"unknown mode {mode!r}; choose fast or sequential")
    if groups != "auto":
        try:
            groups = int(groups)
        except (TypeError, ValueError):
            raise NormswapError(f"groups must be 'auto' or a positive integer, got {groups!r}") from None
        if groups <= 0:
            raise NormswapError(f"groups must be 'auto' or a positive integer, got {groups}")
    if int(batch_size) <= 0:
        raise NormswapError(f"batch size must be positive, got {batch_size}")
    if int(distill_steps) < 0:
        raise NormswapError(f"distill steps must be >= 0, got {distill_steps}")
    if calib_samples is not None and int(calib_samples) <= 0:
        raise NormswapError(f"calib samples must be positive, got {calib_samples}")
    batch_size, distill_steps = int(batch_size), int(distill_steps)

    try:
        from ..io import as_module
    except ImportError:  # pragma: no cover
        module = getattr(model, "module", model)
    else:
        module = as_module(model, require_eager=True, job="convert")
    if not isinstance(module, nn.Module):
        raise NormswapError(f"convert needs a torch.nn.Module, got {type(module).__name__}")

    sources = _resolve_sources(to, source)
    _, world = _dist_info()
    report = ConvertReport(target=to, sources=list(sources), mode=mode, groups=groups,
                           distill_steps=distill_steps, distributed_world_size=world)
    if groups != "auto" and to not in ("gn", "bgn"):
        report.warnings.append(f"groups={groups} (--groups) applies only to the gn and bgn targets; "
                               f"ignored for {to}")

    was_training = module.training
    _detach_nonleaf_attrs(module)
    try:
        work = copy.deepcopy(module)
    except Exception as e:
        raise NormswapError(f"cannot copy the model to convert it ({type(e).__name__}: {e})") from None
    work.eval()

    # ------------------------------------------------------------------ find the sites
    sites: list[_Site] = []
    seen: set[int] = set()
    skipped: dict[str, int] = {}
    inside: list[str] = []  # prefixes of norm modules: their children are part of them
    for name, m in work.named_modules():
        if id(m) in seen or isinstance(m, _CalibSite):
            continue
        if any(name.startswith(p) for p in inside):
            continue
        kind = K.classify(m)
        if kind is None:
            continue
        inside.append(name + "." if name else "")
        if kind not in sources:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        seen.add(id(m))
        K.check_pair(kind, to, m)
        layout = K.layout_of(kind, m)
        if layout is None:
            raise NormswapError(f"{name} ({type(m).__name__}) cannot be converted to {to} "
                                f"(valid pairs: {K.valid_pairs_text()})")
        sites.append(_Site(name or type(m).__name__, kind, m, layout))
    if not sites:
        found = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())) or "no norm layers"
        hints = [f"{k} -> {', '.join(K.valid_targets(k))}" for k in sorted(skipped) if K.valid_targets(k)]
        hint = f"; valid targets for the norms found: {'; '.join(hints)}" if hints else ""
        raise NormswapError(f"no {'/'.join(sources)} layers to convert to {to} in the model (found: {found}){hint}; "
                            "use --from KIND to choose the layers to convert")
    if "unsupported_subclass" in skipped:
        report.warnings.append(f"{skipped['unsupported_subclass']} norm subclass layer(s) were left alone "
                               "(exact types only)")
    _replace_in_parents(work, {id(s.orig): s.wrapper for s in sites})
    report.sources = sorted({s.kind for s in sites}, key=lambda k: list(sources).index(k))

    data = _load_calib(calib, module, calib_samples, report)
    if data is not None and len(data) == 0:
        raise NormswapError("calibration data is empty")
    device, dtype = _param_like(module)

    def to_dev(x: Tensor) -> Tensor:
        if x.is_floating_point():
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)

    def run_batches(m: nn.Module, record=None, two_step: bool = False) -> None:
        for i, (x, y) in enumerate(data.batches(batch_size)):
            try:
                xb = to_dev(x)
                if two_step:  # record the original activations at every site, then the converted run
                    for s in sites:
                        object.__setattr__(s.wrapper, "recording", True)
                        object.__setattr__(s.wrapper, "use_new", False)
                        s.wrapper.recorded.clear()
                    m(xb)
                    for s in sites:
                        object.__setattr__(s.wrapper, "recording", False)
                        object.__setattr__(s.wrapper, "use_new", True)
                out = m(xb)
                if two_step:
                    for s in sites:
                        s.wrapper.recorded.clear()
            except NormswapError:
                raise
            except AttributeError as e:
                attr = getattr(e, "name", None)
                if "_CalibSite" not in str(e) or not attr:
                    raise
                which = [s.name for s in sites if hasattr(s.orig, attr)] or [s.name for s in sites]
                raise NormswapError(
                    f"the model's forward reads '{attr}' of a norm layer directly instead of only calling it "
                    f"({', '.join(which[:5])}{' …' if len(which) > 5 else ''}): such a layer cannot be "
                    f"replaced; exclude its kind with --from or change the model") from None
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise NormswapError(
                    f"calibration data of shape {tuple(data.inputs.shape)} does not fit the model: "
                    f"it expects inputs of shape {expected_input_text(module)} ({type(e).__name__}: {first})"
                ) from None
            if record is not None:
                record(i, x, y, out)

    if data is None:
        msg = "no calibration data: replacements are uncalibrated (source gamma/beta copied)"
        report.warnings.append(msg)
        for s in sites:
            new = _data_free(s, to, groups, _default_ndim(s), *_param_like(s.orig))
            s.wrapper.new = new
            s.calibrated = s.method == "exact"
        report.calibrated = False
    else:
        report.calib_source = data.source
        report.calib_samples = int(_allreduce_floats([float(len(data))])[0])
        report.calib_labels = data.labels is not None
        passes = _passes if _passes is not None else (1 if mode == "fast" else 2)
        passes = max(1, int(passes))
        report.passes = passes
        cache: list[Tensor] | None = []
        cache_bytes = [0]

        def record_out(i, x, y, out):
            nonlocal cache
            if cache is None:
                return
            t = _first_tensor(out).detach().to("cpu")
            cache_bytes[0] += t.numel() * t.element_size()
            if cache_bytes[0] > _CACHE_LIMIT_BYTES:
                cache = None
            else:
                cache.append(t)

        t0 = time.perf_counter()
        with torch.no_grad():
            for p in range(passes):
                for s in sites:
                    s.stats = _make_stats(s, to, groups, device)
                    object.__setattr__(s.wrapper, "stats", s.stats)
                    object.__setattr__(s.wrapper, "collect", True)
                    object.__setattr__(s.wrapper, "use_new", p > 0)
                run_batches(work, record_out if p == 0 else None, two_step=(p > 0 and _target == "model"))
                allreduce_stats([s.stats for s in sites])
                for s in sites:
                    object.__setattr__(s.wrapper, "collect", False)
                    if s.stats.calls == 0:
                        s.wrapper.new = _data_free(s, to, groups, _default_ndim(s), *_param_like(s.orig))
                        s.note = "never called on the calibration data: not calibrated"
                        s.calibrated = s.method == "exact"
                        continue
                    params = _fit_site(s, to, groups, first_pass=(p == 0))
                    _fix_nonfinite(s, params)
                    if s.wrapper.new is None or p == 0 or getattr(s.wrapper.new, "_ns_groups", None) != s.groups:
                        s.wrapper.new = _build_new(s, to, int(s.stats.ndim), *_param_like(s.orig))
                        s.wrapper.new._ns_groups = s.groups
                    _assign(s.wrapper.new, params)
                    s.calibrated = True
                    s.method = "fitted"
                if progress is not None:
                    progress("calibrate", p + 1, passes, None)
        report.calib_seconds = time.perf_counter() - t0
        report.calibrated = True

    # ------------------------------------------------------------------ finalize the model
    for s in sites:
        new = s.wrapper.new
        if hasattr(new, "_ns_groups"):
            del new._ns_groups
    _replace_in_parents(work, {id(s.wrapper): s.wrapper.new for s in sites})
    for s in sites:
        object.__setattr__(s.wrapper, "stats", None)
        s.stats = None

    if data is not None:
        with _eval_mode(module):
            fid, fwd = _fidelity(work, module, data, batch_size, to_dev, cache)
        report.forward_seconds = fwd
        report.fidelity_calibrated = fid
        report.fidelity = fid
        if getattr(fid, "_labels_out_of_range", 0):
            report.warnings.append(
                f"{fid._labels_out_of_range} calibration labels are outside the model's output classes: "
                f"no accuracy reported (are they the labels of this model?)")
        if getattr(fid, "_nonfinite", 0):
            report.warnings.append(
                f"the original model's output is not finite (NaN/Inf) for {fid._nonfinite} of "
                f"{fid._nonfinite + fid.samples} calibration samples: fidelity is measured on the other "
                f"{fid.samples} only" + (" (none left: no fidelity numbers)" if not fid.samples else ""))
        if distill_steps > 0:
            before = {k: v.detach().clone() for k, v in work.state_dict().items()}
            with _eval_mode(module):
                only = [s.wrapper.new for s in sites] if _distill_params == "norms" else None
                loss, secs = _distill(work, module, data, distill_steps, batch_size, to_dev, cache,
                                      fid.classifier, progress, lr=_distill_lr, only=only, mix=_distill_mix)
                report.distill_loss, report.distill_seconds = loss, secs
                fid2, _ = _fidelity(work, module, data, batch_size, to_dev, cache)
            key = (lambda f: f.kl) if fid.classifier else (lambda f: f.rel_output_error)
            k1, k2 = key(fid), key(fid2)
            if k1 is None or k2 is None or not math.isfinite(k2) or k2 > k1:
                work.load_state_dict(before)
                report.warnings.append("distillation did not improve the fit on the calibration data "
                                       "(KL / output error); kept the calibrated parameters")
            else:
                report.fidelity = fid2
    elif distill_steps > 0:
        report.warnings.append("--distill-steps needs calibration data; skipped")
        report.distill_steps = 0

    for s in sites:
        report.layers.append(LayerFit(
            name=s.name, source_kind=s.kind, source_type=type(s.orig).__name__,
            target_type=type(s.wrapper.new).__name__, channels=s.channels, groups=s.groups,
            method=s.method, calibrated=s.calibrated, err_naive=s.err_naive, err_fitted=s.err_fitted,
            group_errors=s.group_errors, note=s.note))
    if was_training:
        report.warnings.append("the model was in training mode: its eval-mode behaviour (running statistics) "
                               "was converted and calibrated; the converted model is returned in training mode")
    work.train(was_training)
    for s in sites:
        s.wrapper = None  # drop references to the originals
    return work, report


def _detach_nonleaf_attrs(model: nn.Module) -> None:
    """Detach plain tensor attributes that carry autograd history (e.g. the ``weight`` that the
    legacy weight-norm / spectral-norm hooks recompute on every forward), which deepcopy refuses.
    The values are unchanged and are recomputed by the hooks anyway."""
    for m in model.modules():
        for key, val in list(vars(m).items()):
            if isinstance(val, Tensor) and not isinstance(val, nn.Parameter) and val.grad_fn is not None:
                setattr(m, key, val.detach())


def _fix_nonfinite(site: _Site, params: dict) -> None:
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


def _default_ndim(site: _Site) -> int:
    if site.wrapper.shape_seen is not None:
        return len(site.wrapper.shape_seen)
    name = type(site.orig).__name__
    for suffix, nd in (("1d", 3), ("2d", 4), ("3d", 5)):
        if name.lower().endswith(suffix):
            return nd
    return 4


# ================================================================================ fidelity / distill

@torch.no_grad()
def _fidelity(work: nn.Module, original: nn.Module, data: _Calib, batch_size: int, to_dev, cache):
    n = agree = kl = sse = ssy = 0.0
    correct_o = correct_c = 0.0
    bad = 0.0  # samples whose original output is not finite: no meaningful comparison
    oob = 0.0  # labels outside the model's classes
    classifier = None
    fwd = 0.0
    for i, (x, y) in enumerate(data.batches(batch_size)):
        xb = to_dev(x)
        t0 = time.perf_counter()
        out = _first_tensor(work(xb)).float()
        fwd += time.perf_counter() - t0
        ref = cache[i].to(out.device).float() if cache is not None else _first_tensor(original(xb)).float()
        if classifier is None:
            classifier = _is_classifier(ref)
        fin = torch.isfinite(ref.reshape(ref.shape[0], -1)).all(1) if ref.dim() else torch.isfinite(ref).reshape(1)
        if not bool(fin.all()):
            bad += float((~fin).sum())
            out, ref = out[fin], ref[fin]
            y = y[fin.to(y.device)] if y is not None else None
        n += out.shape[0]
        sse += float(((out - ref) ** 2).sum())
        ssy += float((ref ** 2).sum())
        if classifier:
            agree += float((out.argmax(1) == ref.argmax(1)).sum())
            lp, lq = F.log_softmax(ref, 1), F.log_softmax(out, 1)
            kl += float((lp.exp() * (lp - lq)).sum())
            if y is not None:
                yb = y.to(out.device).reshape(-1)
                oob += float(((yb < 0) | (yb >= ref.shape[1])).sum())
                correct_o += float((ref.argmax(1) == yb).sum())
                correct_c += float((out.argmax(1) == yb).sum())
    n, agree, kl, sse, ssy, correct_o, correct_c, bad, oob = _allreduce_floats(
        [n, agree, kl, sse, ssy, correct_o, correct_c, bad, oob])
    fid = Fidelity(samples=int(n), classifier=bool(classifier), rel_output_error=_rel(sse, ssy) if n else None)
    fid._nonfinite = int(bad)  # not a field: the caller turns it into a warning
    if classifier and n:
        fid.top1_agreement = agree / max(n, 1)
        fid.kl = kl / max(n, 1)
        fid._labels_out_of_range = int(oob)
        if data.labels is not None and not oob:
            fid.accuracy_original = correct_o / max(n, 1)
            fid.accuracy_converted = correct_c / max(n, 1)
    return fid, fwd


def _distill(work: nn.Module, original: nn.Module, data: _Calib, steps: int, batch_size: int, to_dev,
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
    dist_on, world = _dist_info()
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
                ref = _first_tensor(original(xb)).float()
        else:
          with torch.no_grad():
            ref = targets[idx].to(xb.device).float() if targets is not None else _first_tensor(original(xb)).float()
        out = _first_tensor(work(xb)).float()
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
