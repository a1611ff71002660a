"""Calibration: stream the calibration inputs through the working model and fit every
replacement in closed form after each pass (see :mod:`normswap.convert.core` for the modes).

Each pass drives the site wrappers through one explicit :class:`~normswap.convert.sites.Mode`
per forward: the first pass (``Mode.FIT``) passes the original activations on; later passes
first record the original activations (``Mode.RECORD``), then run with every wrapper passing
its replacement's output on (``Mode.FIT_REPLACED``), so each layer is refitted on the inputs made
by the already-converted layers before it.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from ..data import Dataset, guess_input_shape, is_dataset, load_data
from ..errors import NormswapError
from .fidelity import OutputCache, allreduce_floats, dist_info
from .forward import _first_layer, expected_input_text, forward_error  # noqa: F401 (re-exported)
from .fit import assign, build_new, data_free, fit_site, fix_nonfinite, make_stats
from .report import ConvertReport
from .sites import CalibSite, Mode, Site, calibration_mode, default_ndim, param_like
from .stats import allreduce_stats

__all__ = ["load_calib", "calibrate", "holdback_split", "resolve_target", "replaced_outputs", "uncalibrated", "expected_input_text", "Batches"]


# ================================================================================ data

def _warn_random(report: ConvertReport, shape) -> None:
    msg = (f"calibrating on random inputs of shape {shape}: the fit matches the norms on noise, not on "
           "real activations; pass real calibration data for a faithful conversion")
    warnings.warn(msg, stacklevel=4)  # the caller of convert()
    report.warnings.append(msg)


def load_calib(calib, model: nn.Module, calib_samples: int | None, report: ConvertReport):
    """The calibration inputs as a data set (an in-memory :class:`normswap.data.Dataset` or a
    streaming :class:`normswap.images.ImageFolder`; None without ``calib``); at most
    ``calib_samples`` of them, evenly spread over the data (sorted folders hold whole classes)."""
    if calib is None:
        return None
    if isinstance(calib, str) and calib == "random":
        guess = guess_input_shape(model)
        if guess is None:
            raise NormswapError("calib='random' needs to know the input shape; pass a tensor "
                                "(or on the command line --calib FILE)")
        n = calib_samples or 256
        ds = load_data("random", limit=n, input_shape=(n,) + tuple(guess[1:]), seed=0)
    elif is_dataset(calib):
        ds = calib
    else:
        ds = load_data(calib, model=model)
    if len(ds) == 0:
        raise NormswapError(f"{ds.source or 'calibration data'}: holds no samples")
    if getattr(ds, "synthetic", False):
        _warn_random(report, tuple(ds.sample_shape))
    if calib_samples is not None and int(calib_samples) < len(ds):
        k = int(calib_samples)
        ds = ds.subset([int(i * len(ds) / k) for i in range(k)])
    skipped = getattr(ds, "skipped", None)
    if skipped:  # the same text as the folder's own warning (the CLI shows it once)
        from ..images import skipped_message

        msg = skipped_message(getattr(ds, "root", ds.source), skipped)
        if msg not in report.warnings:
            report.warnings.append(msg)
    return ds


class Batches:
    """The calibration batches on the model's device and dtype; running the model on them turns
    a shape mismatch, or a forward that reads a norm's attributes, into one NormswapError."""

    def __init__(self, data: Dataset, batch_size: int, module: nn.Module, sites: list[Site]) -> None:
        self.data, self.batch_size, self.module, self.sites = data, batch_size, module, sites
        self.device, self.dtype = param_like(module)

    def to_dev(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            return x.to(device=self.device, dtype=self.dtype)
        return x.to(device=self.device)

    def run(self, model: nn.Module, step: Callable[[nn.Module, Tensor], object]):
        """Yield ``step(model, x)`` for every batch (``x`` on the device)."""
        for x, _ in self.data.batches(self.batch_size):
            try:
                out = step(model, self.to_dev(x))
            except NormswapError:
                raise
            except AttributeError as e:
                attr = getattr(e, "name", None)
                if CalibSite.__name__ not in str(e) or not attr:
                    raise NormswapError(forward_error(e, x, self.module)) from None
                which = [s.name for s in self.sites if hasattr(s.orig, attr)] or [s.name for s in self.sites]
                raise NormswapError(
                    f"the model's forward reads '{attr}' of a norm layer directly instead of only calling it "
                    f"({', '.join(which[:5])}{' …' if len(which) > 5 else ''}): such a layer cannot be "
                    f"replaced; exclude its kind with --from or change the model") from None
            except Exception as e:  # noqa: BLE001 - the user's model raised on the user's data
                raise NormswapError(forward_error(e, x, self.module)) from None
            yield out


# ================================================================================ passes

def _fit_pass(sites: list[Site], model: nn.Module, batches: Batches, mode: Mode, record_first: bool,
              on_output: Callable | None = None) -> None:
    """One pass over the calibration data in ``mode`` (``on_output(out)`` per batch)."""

    def step(m: nn.Module, x: Tensor):
        if record_first:  # the original activations at every site, then the run that fits
            for s in sites:
                s.wrapper.recorded.clear()
            with calibration_mode(sites, Mode.RECORD):
                m(x)
        with calibration_mode(sites, mode):
            out = m(x)
        if record_first:
            for s in sites:
                s.wrapper.recorded.clear()
        return out

    for out in batches.run(model, step):
        if on_output is not None:
            on_output(out)


def _fit_sites(sites: list[Site], to: str, groups, first_pass: bool) -> None:
    """Fit every site from the statistics of the pass just run."""
    for s in sites:
        if s.stats.calls == 0:
            s.wrapper.new = data_free(s, to, groups, default_ndim(s), *param_like(s.orig))
            s.note = "never called on the calibration data: not calibrated"
            s.calibrated = s.method == "exact"
            continue
        params = fit_site(s, to, groups, first_pass=first_pass)
        fix_nonfinite(s, params)
        if s.wrapper.new is None or first_pass or getattr(s.wrapper.new, "_ns_groups", None) != s.groups:
            s.wrapper.new = build_new(s, to, int(s.stats.ndim), *param_like(s.orig))
            s.wrapper.new._ns_groups = s.groups
        assign(s.wrapper.new, params)
        s.calibrated = True
        s.method = "exact" if getattr(s, "exact", False) else "fitted"


def resolve_target(target: str, to: str) -> str:
    """``target="auto"``: "norm" for the per-sample targets (gn, ln, in, frn), "model" otherwise.

    What a replacement is fitted to in the passes after the first, where it sees the converted
    model's own input ``x_conv``: "model" (the original model's activation ``y_orig`` at that site)
    or "norm" (``original_norm(x_conv)``).  Least squares of ``y_orig`` on ``new(x_conv)`` is an
    errors-in-variables regression: ``x_conv`` is a noisy copy of ``x_orig``, so the fitted gamma is
    attenuated by about ``var(signal) / (var(signal) + var(noise))``, and the shrinkage compounds
    with depth (EfficientNet-Lite1 BN->GN: per-layer slope of the fitted output on the original
    falling to 0.03-0.5, |gamma| below fast mode's in 63 of 64 layers, held-out top-1 ~0 %).
    ``original_norm(x_conv)`` is a deterministic function of the regressor's own input: no
    attenuation.  Whichever is used, :func:`calibrate` keeps the pass-1 (fast) fit when it is better
    on the held-back calibration samples."""
    if target == "auto":
        return "norm" if to in ("gn", "ln", "in", "frn") else "model"
    if target not in ("model", "norm"):
        raise NormswapError(f"unknown calibration target {target!r} (auto, model or norm)")
    return target


#: share of the calibration samples held back (sequential / reconstruct modes) to choose between fits
HOLDBACK_SHARE = 1 / 7
#: fewest calibration samples for which a hold-back is made
HOLDBACK_MIN_SAMPLES = 14


def holdback_split(data, share: float = HOLDBACK_SHARE, min_samples: int = HOLDBACK_MIN_SAMPLES):
    """The calibration data reordered so that a deterministic ``share`` of it (every k-th sample,
    so that sorted data is sampled evenly) comes last; returns ``(data, held)`` with ``held`` the
    number of held-back samples at the end (0 when there are too few samples)."""
    n = len(data)
    if n < min_samples or share <= 0:
        return data, 0
    step = max(2, int(round(1 / share)))
    held_idx = torch.arange(step - 1, n, step)
    mask = torch.ones(n, dtype=torch.bool)
    mask[held_idx] = False
    order = torch.cat([mask.nonzero().flatten(), held_idx])
    return data.subset(order), int(held_idx.numel())


def held_parts(data, held: int):
    """The data :func:`holdback_split` reordered, as ``(trained on, held back)``: all but the last
    ``held`` samples, and those (None when nothing is held back)."""
    n = len(data)
    return (data.subset(range(n - held)), data.subset(range(n - held, n))) if held else (data, None)


def _sub_batches(batches: Batches, start: int, stop: int) -> Batches:
    # the same kind of batches (a BoundedBatches stays memory-bounded)
    return type(batches)(batches.data.subset(range(start, stop)), batches.batch_size, batches.module,
                         batches.sites)


def _score(out: Tensor, ref: Tensor) -> float:
    """KL(ref || out) per sample for classifier logits, else the relative output error."""
    from .fidelity import first_tensor, is_classifier
    out, ref = first_tensor(out).double(), first_tensor(ref).double()
    if is_classifier(ref):
        lp, lq = torch.log_softmax(ref, 1), torch.log_softmax(out, 1)
        return float((lp.exp() * (lp - lq)).sum(1).mean())
    return float(((out - ref) ** 2).sum() / (ref ** 2).sum().clamp_min(1e-30)) ** 0.5


def replaced_outputs(work: nn.Module, sites: list[Site], batches: Batches) -> Tensor:
    """The model's outputs with every site's current replacement in place of its wrapper."""
    from .fidelity import first_tensor
    from .sites import replace_in_parents
    replace_in_parents(work, {id(s.wrapper): s.wrapper.new for s in sites})
    try:
        return torch.cat([first_tensor(o).detach().cpu() for o in batches.run(work, lambda m, x: m(x))])
    finally:
        replace_in_parents(work, {id(s.wrapper.new): s.wrapper for s in sites})


_SITE_FIELDS = ("groups", "err_naive", "err_fitted", "group_errors", "method", "note", "calibrated")


def _snapshot(sites: list[Site]) -> list[tuple]:
    return [(s.wrapper.new, {k: v.detach().clone() for k, v in s.wrapper.new.state_dict().items()}
             if s.wrapper.new is not None else None, {f: getattr(s, f) for f in _SITE_FIELDS}) for s in sites]


def _restore(sites: list[Site], snap: list[tuple]) -> None:
    for s, (mod, state, fields) in zip(sites, snap):
        s.wrapper.new = mod
        if mod is not None and state is not None:
            mod.load_state_dict(state)
        for f, v in fields.items():
            setattr(s, f, v)


def _merged(a, b):
    """The statistics of two disjoint parts of the data, added (a new object; ``a`` is kept)."""
    import copy
    m = copy.copy(a)
    for name, ta in vars(a).items():
        if isinstance(ta, Tensor):
            setattr(m, name, ta.clone())
    for x, y in zip(m.sum_tensors(), b.sum_tensors()):
        x += y
    for x, y in zip(m.min_tensors(), b.min_tensors()):
        torch.minimum(x, y, out=x)
    m.calls, m.ndim = a.calls + b.calls, max(a.ndim, b.ndim)
    return m


def calibrate(work: nn.Module, sites: list[Site], batches: Batches, to: str, groups, *, passes: int,
              target: str = "auto", held: int = 0, progress: Callable | None = None,
              choice: dict | None = None) -> OutputCache:
    """Run ``passes`` calibration passes, fitting every site after each; returns the original
    model's outputs on ``batches`` (recorded by the first pass, which computes exactly the
    original model), in batches of ``batches.batch_size``.

    ``held`` > 0 (with ``passes`` > 1): the statistics of the last ``held`` samples of
    ``batches.data`` are kept apart.  After the passes the pass-1 (fast) fit and the final
    (sequential) fit *without* those samples are both scored on them (KL to the original for
    classifiers, else relative output error), and the winner is kept, refitted on all the samples
    (the statistics are additive: no extra pass).  So sequential is never worse than fast on
    calibration data it did not fit; the cost is two forwards of the held-back samples.  (The
    pass-2 inputs are made by the pass-1 fits on all samples: the held-back samples leak into the
    sequential fit only at second order, which if anything favours fast.)  ``choice`` (a dict)
    receives the scores and the pick."""
    target = resolve_target(target, to)
    n = len(batches.data)
    held = int(held) if passes > 1 and 0 < int(held) < n else 0
    parts = [_sub_batches(batches, 0, n - held), _sub_batches(batches, n - held, n)] if held else [batches]
    cache = OutputCache()
    fast_snap = fast_sub = None
    with torch.no_grad():
        for p in range(passes):
            mode = Mode.FIT if p == 0 else Mode.FIT_REPLACED
            part_stats = []
            for part in parts:
                for s in sites:
                    s.stats = make_stats(s, to, groups, batches.device)
                    s.wrapper.stats = s.stats
                _fit_pass(sites, work, part, mode, record_first=(p > 0 and target == "model"),
                          on_output=cache.add if p == 0 else None)
                allreduce_stats([s.stats for s in sites])
                part_stats.append([s.stats for s in sites])
            last = p == passes - 1
            if held and (p == 0 or last):  # the fit without the held-back samples, to be scored
                for s, st in zip(sites, part_stats[0]):
                    s.stats = st
                _fit_sites(sites, to, groups, first_pass=(p == 0))
                sub = _snapshot(sites)
                if p == 0:
                    fast_sub = sub
                else:
                    seq_sub = sub
            for k, s in enumerate(sites):
                s.stats = part_stats[0][k] if not held else _merged(part_stats[0][k], part_stats[1][k])
            _fit_sites(sites, to, groups, first_pass=(p == 0))
            if p == 0 and held:
                fast_snap = _snapshot(sites)
            if progress is not None:
                progress("calibrate", p + 1, passes, None)
        for s in sites:
            s.wrapper.stats = None
        if held:
            hb = parts[1]
            final = _snapshot(sites)
            ref = torch.cat(cache.tensors)[n - held:] if cache.tensors is not None else torch.cat(
                [_first(o).detach().cpu() for o in hb.run(work, lambda m, x: m(x))])
            _restore(sites, seq_sub)
            seq_score = _score(replaced_outputs(work, sites, hb), ref)
            _restore(sites, fast_sub)
            fast_score = _score(replaced_outputs(work, sites, hb), ref)
            seq_score, fast_score = (v / dist_info()[1] for v in allreduce_floats([seq_score, fast_score]))
            keep_seq = not (fast_score < seq_score) or not math.isfinite(fast_score)
            _restore(sites, final if keep_seq else fast_snap)
            if choice is not None:
                choice.update({"held_back": held, "target": target, "score_sequential": seq_score,
                               "score_fast": fast_score, "kept": "sequential" if keep_seq else "fast"})
    if cache.tensors is not None and held:
        cache.tensors = list(torch.cat(cache.tensors).split(batches.batch_size))
    return cache


def _first(out) -> Tensor:
    from .fidelity import first_tensor
    return first_tensor(out)


def uncalibrated(sites: list[Site], to: str, groups) -> None:
    """Without data: exact closed forms where they exist, else the source's gamma/beta."""
    for s in sites:
        s.wrapper.new = data_free(s, to, groups, default_ndim(s), *param_like(s.orig))
        s.calibrated = s.method == "exact"


def calib_count(data: Dataset) -> int:
    """Calibration samples over all ranks."""
    return int(allreduce_floats([float(len(data))])[0])
