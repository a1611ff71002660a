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

import contextlib
import copy
import math
import time
from typing import Callable

from torch import nn

from ..errors import NormswapError
from ..io import as_module
from ..norms import NORMS
from . import kinds as K
from .calibrate import (Batches, calib_count, calibrate, expected_input_text, holdback_split, load_calib,
                        uncalibrated)
from .distill import distill as _distill
from .fidelity import OutputCache, dist_info, eval_mode, fidelity
from .report import ConvertReport, LayerFit
from .sites import Site, detach_nonleaf_attrs, find_sites, replace_in_parents, subclass_reasons
from .bounded import BoundedBatches
from .checks import check_data
from .fidelity import heldout_fidelity

__all__ = ["convert", "expected_input_text", "MODES", "recon_options"]


MODES = ("fast", "sequential", "reconstruct")


def convert(model, to: str = "gn", calib=None, *, source=None, groups="auto", mode: str = "sequential",
            distill_steps: int = 0, batch_size: int = 64, calib_samples: int | None = None,
            progress: Callable | None = None, time_budget_s: float | None = None,
            recon_steps: int | None = None, _passes: int | None = None,
            _target: str = "auto", _distill_lr: float = 3e-4, _distill_params: str = "all",
            _distill_mix: bool = False, _recon: dict | None = None,
            _holdback: bool = True, eval_data=None) -> tuple[nn.Module, ConvertReport]:
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
    mode: ``"sequential"`` (default), ``"fast"`` or ``"reconstruct"``; see the module docstring.
        ``"reconstruct"``: the sequential closed-form fit, then block reconstruction
        (:mod:`normswap.convert.reconstruct`): block by block, only the replacement norms'
        parameters are optimised so that each block's output on the converted model's own input
        matches the original block's output, with augmentation, early stopping and revert on a
        held-back 1/7 of the calibration samples.
    distill_steps: steps of distillation against the original after calibration (after the
        reconstruction in ``mode="reconstruct"``: augmented KL distillation of the norms only).
    eval_data: held-out inputs (same forms as ``calib``) on which fidelity is measured
        (``report.fidelity_eval``); without it the calibration-set numbers are in-sample.
    progress: optional callable ``progress(stage, step, total, loss)`` with stage "calibrate"
        (per pass), "reconstruct" (per step; loss is the block's loss) or "distill" (per step).
    time_budget_s: wall-clock budget of the reconstruction (and its distillation) in seconds.
    recon_steps: optimisation steps per block in ``mode="reconstruct"`` (default
        :data:`RECON_STEPS`).

    Private knobs (for benchmarks and experiments, not a stable API): ``_passes`` (number of
    calibration passes), ``_target`` ("model": fit to the original model's activation, default;
    "norm": fit to original_norm(x_converted); "auto": norm for per-sample targets), ``_recon``
    (extra keyword arguments of :func:`normswap.convert.reconstruct.reconstruct`), ``_holdback``
    (False: no held-back samples, no fast-vs-sequential choice), ``_distill_lr`` (3e-4), ``_distill_params``
    ("all" or "norms": only the replacement layers), ``_distill_mix`` (mixup of calibration inputs).

    Returns ``(converted_model, ConvertReport)``.
    """
    to, groups, batch_size, distill_steps = _check_options(to, mode, groups, batch_size, distill_steps,
                                                           calib_samples)
    if time_budget_s is not None and not float(time_budget_s) > 0:
        raise NormswapError(f"time budget must be a positive number of seconds, got {time_budget_s}")
    if recon_steps is not None and int(recon_steps) < 0:
        raise NormswapError(f"reconstruction steps must be >= 0, got {recon_steps}")
    module = as_module(model, require_eager=True, job="convert")
    if not isinstance(module, nn.Module):
        raise NormswapError(f"convert needs a torch.nn.Module, got {type(module).__name__}")
    sources = _resolve_sources(to, source)
    report = ConvertReport(target=to, sources=list(sources), mode=mode, groups=groups,
                           distill_steps=distill_steps, distributed_world_size=dist_info()[1])
    if groups != "auto" and not K.TARGETS[to].grouped:
        report.warnings.append(f"groups={groups} (--groups) applies only to the "
                               f"{' and '.join(t for t, s in K.TARGETS.items() if s.grouped)} targets; "
                               f"ignored for {to}")
    was_training = module.training
    work = _working_copy(module)

    # 1. find the sites and put a calibration wrapper in each one's place
    sites = _sites(work, to, sources, report)
    # 2. calibrate (or, without data, the data-free replacements)
    data = load_calib(calib, module, calib_samples, report)
    if data is not None and len(data) == 0:
        raise NormswapError("calibration data is empty")
    report.warnings.extend(check_data(data, module, "calibration data", raw=calib))
    evald = load_calib(eval_data, module, None, ConvertReport()) if eval_data is not None else None
    report.warnings.extend(check_data(evald, module, "eval data", raw=eval_data))
    held = 0
    if _holdback and dist_info()[1] > 1 and data is not None:
        # each process would hold back its own samples: the pick between the fast and the sequential
        # fit could then differ from a single process on the union, so it is off under torch.distributed
        _holdback = False
        report.warnings.append("torch.distributed: the held-back comparison of the fast and sequential fits is off "
                            "(every process fits on all of its samples; the result equals one process on the union)")
    if data is not None and len(data) and mode in ("sequential", "reconstruct") and _holdback:
        data, held = holdback_split(data)  # the last `held` samples choose between fits
    batches = BoundedBatches(data, batch_size, module, sites) if data is not None else None
    cache = None
    if batches is None:
        report.warnings.append("no calibration data: replacements are uncalibrated (source gamma/beta copied)")
        uncalibrated(sites, to, groups)
        report.calibrated = False
    else:
        passes = max(1, int(_passes if _passes is not None else (1 if mode == "fast" else 2)))
        report.calib_source, report.calib_samples = data.source, calib_count(data)
        report.calib_labels, report.passes = data.labels is not None, passes
        t0 = time.perf_counter()
        choice: dict = {}
        cache = calibrate(work, sites, batches, to, groups, passes=passes, target=_target, held=held,
                          progress=progress, choice=choice)
        report.calib_seconds = time.perf_counter() - t0
        report.calibration_choice = choice or None
        report.calibrated = True
    # 3. finalise: the fitted replacements take the wrappers' places
    _finalise(work, sites)
    # 4. measure fidelity, 5. distil
    if batches is not None:
        if mode == "reconstruct":
            t0 = time.perf_counter()
            budget = time_budget_s if time_budget_s is not None else _RECON_DEFAULTS.get("time_budget_s")
            if budget is None:
                budget = RECON_BUDGET_X * report.calib_seconds
            steps = recon_steps if recon_steps is not None else _RECON_DEFAULTS.get("recon_steps", RECON_STEPS)
            _reconstruct(work, module, batches, sites, held, report, progress, float(budget), int(steps),
                         distill_steps, _recon)
            report.calib_seconds = (report.calib_seconds or 0.0) + time.perf_counter() - t0
        _measure(work, module, batches, cache, report)
        if distill_steps > 0 and mode != "reconstruct":
            _distill_step(work, module, batches, cache, sites, report, distill_steps, progress,
                          lr=_distill_lr, params=_distill_params, mix=_distill_mix)
    elif mode == "reconstruct":
        report.warnings.append("--mode reconstruct needs calibration data; replacements are uncalibrated")
    if batches is None and distill_steps > 0:
        report.warnings.append("--distill-steps needs calibration data; skipped")
        report.distill_steps = 0
    if evald is not None:
        heldout_fidelity(work, module, evald, batch_size, Batches(evald, batch_size, module, sites).to_dev, report)
    # 6. report
    _report_layers(sites, report)
    if was_training:
        report.warnings.append("the model was in training mode: its eval-mode behaviour (running statistics) "
                               "was converted and calibrated; the converted model is returned in training mode")
    work.train(was_training)
    for s in sites:
        s.wrapper = None  # drop references to the originals
    return work, report


# ================================================================================ the steps

def _check_options(to, mode, groups, batch_size, distill_steps, calib_samples):
    to = str(to).lower()
    if to not in K.TARGETS:
        raise NormswapError(f"unknown target {to!r}; choose one of {', '.join(K.TARGETS)} "
                            f"(valid pairs: {K.valid_pairs_text()})")
    if mode not in MODES:
        raise NormswapError(f"unknown mode {mode!r}; choose fast, sequential or reconstruct")
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
    return to, groups, int(batch_size), int(distill_steps)


def _resolve_sources(to: str, source) -> tuple[str, ...]:
    if source is None:
        return K.default_sources(to)
    if isinstance(source, str):
        items = [s.strip() for s in source.split(",") if s.strip()]
    else:
        items = [str(s) for s in source]
    if not items:
        raise NormswapError("--from needs at least one norm kind")
    known = {k for k, nk in NORMS.items() if nk.stats != "weight"}  # module norms (not reparametrisations)
    for s in items:
        if s not in known:
            raise NormswapError(f"unknown --from kind {s!r}; known kinds: {', '.join(K.source_kinds())}")
        K.check_pair(s, to)
    return tuple(items)


def _working_copy(module: nn.Module) -> nn.Module:
    detach_nonleaf_attrs(module)
    try:
        work = copy.deepcopy(module)
    except Exception as e:
        raise NormswapError(f"cannot copy the model to convert it ({type(e).__name__}: {e})") from None
    return work.eval()


def _sites(work: nn.Module, to: str, sources: tuple[str, ...], report: ConvertReport) -> list[Site]:
    """Find the norms to convert and put a calibration wrapper in each one's place."""
    sites, skipped = find_sites(work, to, sources)
    if not sites:
        found = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())) or "no norm layers"
        hints = [f"{k} -> {', '.join(K.valid_targets(k))}" for k in sorted(skipped) if K.valid_targets(k)]
        hint = f"; valid targets for the norms found: {'; '.join(hints)}" if hints else ""
        if "unsupported_subclass" in skipped:
            hint += f"; left alone (not recognised by structure): {subclass_reasons(work)}"
        raise NormswapError(f"no {'/'.join(sources)} layers to convert to {to} in the model (found: {found}){hint}; "
                            "use --from KIND to choose the layers to convert")
    if "unsupported_subclass" in skipped:
        report.warnings.append(f"{skipped['unsupported_subclass']} norm subclass layer(s) were left alone "
                               f"(not recognised by structure, exact types only): {subclass_reasons(work)}")
    replace_in_parents(work, {id(s.orig): s.wrapper for s in sites})
    report.sources = sorted({s.kind for s in sites}, key=lambda k: list(sources).index(k))
    return sites


def _finalise(work: nn.Module, sites: list[Site]) -> None:
    """Swap every wrapper for its fitted replacement."""
    for s in sites:
        new = s.wrapper.new
        if hasattr(new, "_ns_groups"):
            del new._ns_groups
    replace_in_parents(work, {id(s.wrapper): s.wrapper.replacement() for s in sites})
    for s in sites:
        s.wrapper.stats = None
        s.stats = None


def _measure(work: nn.Module, module: nn.Module, batches: Batches, cache: OutputCache | None,
             report: ConvertReport) -> None:
    """Fidelity of the converted model on the calibration inputs (and its warnings)."""
    with eval_mode(module):
        fid, fwd = fidelity(work, module, batches.data, batches.batch_size, batches.to_dev,
                            cache.tensors if cache is not None else None)
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


def _distill_step(work: nn.Module, module: nn.Module, batches: Batches, cache: OutputCache | None,
                  sites: list[Site], report: ConvertReport, steps: int, progress, *, lr: float, params: str,
                  mix: bool) -> None:
    """Distil towards the original; keep the result only if it improves the calibration fit."""
    fid = report.fidelity_calibrated
    tensors = cache.tensors if cache is not None else None
    before = {k: v.detach().clone() for k, v in work.state_dict().items()}
    with eval_mode(module):
        only = [s.wrapper.new for s in sites] if params == "norms" else None
        loss, secs = _distill(work, module, batches.data, steps, batches.batch_size, batches.to_dev, tensors,
                              fid.classifier, progress, lr=lr, only=only, mix=mix)
        report.distill_loss, report.distill_seconds = loss, secs
        fid2, _ = fidelity(work, module, batches.data, batches.batch_size, batches.to_dev, tensors)
    key = (lambda f: f.kl) if fid.classifier else (lambda f: f.rel_output_error)
    k1, k2 = key(fid), key(fid2)
    if k1 is None or k2 is None or not math.isfinite(k2) or k2 > k1:
        work.load_state_dict(before)
        report.warnings.append("distillation did not improve the fit on the calibration data "
                               "(KL / output error); kept the calibrated parameters")
    else:
        report.fidelity = fid2


#: optimisation steps per block in mode="reconstruct" (cut to fit the time budget)
RECON_STEPS = 40
#: default reconstruction time budget, as a multiple of the closed-form calibration's wall time
#: (which is ~3.5 forward passes over the calibration set): the whole conversion then costs about
#: 25-30 forward passes
RECON_BUDGET_X = 5.5
#: options set by :func:`recon_options` (the CLI's --time-budget)
_RECON_DEFAULTS: dict = {}


@contextlib.contextmanager
def recon_options(**kw):
    """Defaults for ``convert(mode="reconstruct")`` within the block (``time_budget_s``,
    ``recon_steps``), for callers that go through :func:`normswap.convert.pipeline.convert_file`."""
    old = dict(_RECON_DEFAULTS)
    _RECON_DEFAULTS.update({k: v for k, v in kw.items() if v is not None})
    try:
        yield
    finally:
        _RECON_DEFAULTS.clear()
        _RECON_DEFAULTS.update(old)


def _reconstruct(work, module, batches, sites, held, report, progress, budget, steps, distill_steps, extra):
    """Block reconstruction of the replacement norms (in place), after the closed-form fit."""
    from .reconstruct import reconstruct
    names = {id(m): n for n, m in work.named_modules()}
    norms = [names[id(s.wrapper.new)] for s in sites if id(s.wrapper.new) in names]
    cb = None
    if progress is not None:
        counter = {"k": 0}

        def cb(block, step, loss):
            counter["k"] += 1
            progress("distill" if block == "distill" else "reconstruct", counter["k"], None, loss)
    kw = dict(steps_per_block=steps, held=held, distill_steps=distill_steps, time_budget_s=budget)
    kw.update(extra or {})
    with eval_mode(module):
        x = batches.to_dev(batches.data.inputs)
        info = reconstruct(module, work, x, norms=norms, progress=cb, **kw)
    report.reconstruct = info
    report.distill_steps = distill_steps


def _report_layers(sites: list[Site], report: ConvertReport) -> None:
    for s in sites:
        report.layers.append(LayerFit(
            name=s.name, source_kind=s.kind, source_type=type(s.orig).__name__,
            target_type=type(s.wrapper.new).__name__, channels=s.channels, groups=s.groups,
            method=s.method, calibrated=s.calibrated, err_naive=s.err_naive, err_fitted=s.err_fitted,
            group_errors=s.group_errors, note=s.note))
