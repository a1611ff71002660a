"""`convert()`: replace norm layers, calibrate the replacements, optionally repair.

How it works
------------
1. The model is deep-copied and put in eval mode.  Every selected norm module is replaced *in its
   parent* (``parent._modules[name]``) by a calibration wrapper holding the original norm and its
   replacement, so user module classes and names are kept and no FX tracing is needed.  At the
   end the wrappers are swapped for the replacements.
2. Channel reweighting (targets that pool channels: gn, ln; :mod:`normswap.convert.reweight`):
   one pass on the original activations gives, per norm whose input is the output of its own
   Conv / ConvTranspose / Linear, the output scale and shift of that producer under which the
   new norm's closed-form calibration error is least; they are folded into the producer (an exact
   rewrite of the original model: the wrapper undoes them in front of the original norm, and each
   site is checked on the first calibration samples) and stay in the converted model.
3. Calibration passes stream the calibration inputs (in batches: an image folder is never
   decoded whole) through the working model.  At each site the wrapper computes
   ``y = original_norm(x)`` on the input ``x`` that arrives there and adds the sufficient
   statistics of the regression of ``y`` on the replacement's normalised output (see
   :mod:`normswap.convert.stats`); after the pass every replacement is fitted in closed form
   (running statistics where the target has them, then per-channel gamma/beta; the group count
   when ``groups="auto"``).

   * ``mode="fast"``: one pass in which every wrapper passes ``y`` on, i.e. the working model
     computes exactly the original model; each layer is fitted on the original activations.
   * ``mode="sequential"`` (default): pass 1 is the fast pass; in pass 2 every wrapper passes
     its replacement's output on, so each layer sees the input ``x_conv`` made by the
     already-converted layers before it and is refitted there (to ``original_norm(x_conv)`` for
     per-sample targets, see :func:`normswap.convert.calibrate.resolve_target`).  A held-back
     1/7 of the samples chooses between the fast and the sequential fit.
   * ``mode="fit"``: the sequential fit, then only the replacements' scale and shift are trained
     toward the original's outputs (gradient descent on the calibration inputs and their mirror
     images, :data:`FIT_OPTIONS`), kept only when better on the held-back 1/7.
4. Fidelity of the converted model against the original on the calibration inputs (in-sample)
   and, with ``eval_data``, on held-out inputs: top-1 agreement, top-5 overlap, KL, accuracy
   with labels, and the error of every output.
5. ``repair=True``: distillation toward the original within ``time_budget_s`` on the
   calibration inputs and their mirror images, early-stopped and reverted on the held-back samples
   (:mod:`normswap.convert.repair`).

Under ``torch.distributed`` (e.g. torchrun) every statistic is all-reduced before each fit (and
the fidelity sums; repair trains with DistributedDataParallel), so every rank gets the model a
single process would get from the union of the ranks' calibration data.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..errors import NormswapError
from ..io import as_module
from ..norms import NORMS
from . import kinds as K
from .bounded import BoundedBatches
from .calibrate import (Batches, calib_count, calibrate, expected_input_text, held_parts, holdback_split,
                        load_calib, uncalibrated)
from .checks import check_data
from .fidelity import OutputCache, chance_warning, dist_info, eval_mode, fidelity, heldout_fidelity
from .repair import RepairOptions, not_kept_reason
from .reweight import REWEIGHT_TARGETS, ReweightOptions
from .report import ConvertReport, LayerFit
from .sites import Site, detach_nonleaf_attrs, find_sites, replace_in_parents, subclass_reasons

__all__ = ["convert", "expected_input_text", "MODES", "ConvertOptions", "DEFAULT_REPAIR_BUDGET_S"]


MODES = ("fast", "sequential", "fit")
#: the affine fit of ``mode="fit"``: only the replacement norms' scale and shift are trained, to the
#: original's logits (KL; relative output error for other outputs), on the calibration inputs and
#: their mirror images, for ``fit_epochs`` epochs (EfficientNet-Lite0/1/2 on 256 ImageNet photos:
#: held-out KL -8..-12 %, calibration 25-28x one forward pass in all, the sequential fit's 6-10x included)
FIT_OPTIONS = RepairOptions(params="norms", norm_lr=1e-3, feature_weight=0.0, crop_scale=None, flip=True,
                            batch_size=32, eval_every_s=1e9, temperature=1.0, blend=1.0)
#: repair's wall-clock budget when none is given (seconds)
DEFAULT_REPAIR_BUDGET_S = 600.0


@dataclass
class ConvertOptions:
    """Expert settings (benchmarks and experiments; the defaults are what was measured best).

    ``passes``: calibration passes (default 1 for fast, 2 for sequential); ``target``: what the
    sequential passes fit to ("auto", "model" or "norm", see
    :func:`normswap.convert.calibrate.resolve_target`); ``holdback``: hold back 1/7 of the
    calibration samples to choose between the fast and the sequential fit and to early-stop
    repair; ``repair``: :class:`normswap.convert.repair.RepairOptions`; ``repair_steps``: stop
    repair after this many steps (deterministic runs; the time budget still applies)."""

    passes: int | None = None
    target: str = "auto"
    holdback: bool = True
    repair: RepairOptions = field(default_factory=RepairOptions)
    repair_steps: int | None = None
    #: mode="fit": epochs of the affine fit over the (not held-back) calibration samples
    fit_epochs: int = 6
    #: GroupNorm / channel LayerNorm targets: choose each producer's output scale and shift for the
    #: new norm before calibrating (:mod:`normswap.convert.reweight`)
    reweight: bool = True
    reweight_options: ReweightOptions = field(default_factory=ReweightOptions)


def convert(model, to: str = "gn", calib=None, *, source=None, groups="auto", mode: str = "sequential",
            batch_size: int = 64, calib_samples: int | None = None, eval_data=None, repair: bool = False,
            time_budget_s: float | None = None, progress: Callable | None = None,
            options: ConvertOptions | None = None) -> tuple[nn.Module, ConvertReport]:
    """Replace norm layers by ``to`` and fit the replacements on calibration data.

    Parameters
    ----------
    model: an ``nn.Module`` (or a ``normswap.io.LoadedModel``); it is not modified.
    to: target kind: gn, in, ln, bn, bgn, frn, affine (conv feature maps) or rms (token models;
        ``ln`` also works for token models).
    calib: calibration inputs: a tensor / ndarray, an ``(inputs, labels)`` pair, an iterable of
        tensors or of (inputs, labels) batches (e.g. a DataLoader), a ``normswap.data.Dataset``
        or streaming :class:`normswap.images.ImageFolder`, a path as accepted by
        ``normswap.data.load_data``, or ``"random"`` (with a warning).  ``None``: no calibration
        (exact closed forms where they exist, else the source's gamma/beta are copied); the report
        is marked uncalibrated.
    source: norm kind(s) to convert (str, comma-separated str or list); default every BatchNorm
        (for ``to="bn"`` every other conv-layout norm, for ``to="rms"`` every LayerNorm).
    groups: ``"auto"`` (GroupNorm: the divisor of C with the least calibration reconstruction error)
        or an int.
    mode: ``"sequential"`` (default), ``"fast"`` or ``"fit"`` (sequential, then the replacements'
        scale and shift fitted by gradient descent to the original's outputs); see the module
        docstring.
    calib_samples: use at most this many calibration samples (evenly spread over the data).
    eval_data: held-out inputs (same forms as ``calib``) on which fidelity is measured
        (``report.fidelity_eval``); without it the numbers are in-sample.
    repair: after calibration, distil toward the original on the calibration inputs (and their
        mirror images) within ``time_budget_s`` seconds (default :data:`DEFAULT_REPAIR_BUDGET_S`),
        early-stopped and reverted on held-back calibration samples (``report.repair``).
    progress: optional callable ``progress(stage, step, total, loss, eta_s=None)`` with stage
        "calibrate" (per pass) or "repair" (per step).
    options: :class:`ConvertOptions` (expert settings).

    Returns ``(converted_model, ConvertReport)``.
    """
    opts = options or ConvertOptions()
    to, groups, batch_size = _check_options(to, mode, groups, batch_size, calib_samples, time_budget_s)
    module = as_module(model, require_eager=True, job="convert")
    if not isinstance(module, nn.Module):
        raise NormswapError(f"convert needs a torch.nn.Module, got {type(module).__name__}")
    sources = _resolve_sources(to, source)
    report = ConvertReport(target=to, sources=list(sources), mode=mode, groups=groups,
                           distributed_world_size=dist_info()[1])
    if groups != "auto" and not K.TARGETS[to].grouped:
        report.warnings.append(f"groups={groups} (--groups) applies only to the "
                               f"{' and '.join(t for t, s in K.TARGETS.items() if s.grouped)} targets; "
                               f"ignored for {to}")
    if not opts.reweight and to not in REWEIGHT_TARGETS:
        report.warnings.append(f"reweight=False (--no-reweight) applies only to the {' and '.join(REWEIGHT_TARGETS)} "
                               f"targets, whose statistics pool channels; nothing to turn off for {to}")
    was_training = module.training
    work = _working_copy(module)
    sites = _sites(work, to, sources, report)  # a calibration wrapper in each norm's place
    data = load_calib(calib, module, calib_samples, report)
    report.warnings.extend(check_data(data, module, "calibration data"))
    evald = load_calib(eval_data, module, None, ConvertReport()) if eval_data is not None else None
    report.warnings.extend(check_data(evald, module, "eval data"))
    data, held, repair_held = _holdback(data, mode, repair, opts, report)
    batches = BoundedBatches(data, batch_size, module, sites) if data is not None else None
    cache = _calibrate(work, sites, batches, to, groups, mode, held, opts, progress, report)
    _finalise(work, sites)  # the fitted replacements take the wrappers' places
    if batches is not None and mode == "fit":
        _fit_affine(work, module, data, repair_held, sites, batches, opts, progress, report)
    if batches is not None:
        _measure(work, module, batches, cache, report)
        if repair:
            _repair(work, module, data, repair_held, sites, batches, time_budget_s, opts, progress, report)
    elif repair:
        report.warnings.append("--repair needs calibration data; the replacements are uncalibrated")
    if evald is not None:
        heldout_fidelity(work, module, evald, batch_size, Batches(evald, batch_size, module, sites).to_dev, report)
    _refuse_nonfinite(report)
    _report_layers(sites, report)
    if was_training:
        report.warnings.append("the model was in training mode: its eval-mode behaviour (running statistics) "
                               "was converted and calibrated; the converted model is returned in training mode")
    work.train(was_training)
    for s in sites:
        s.wrapper = None  # drop references to the originals
    return work, report


def _holdback(data, mode: str, repair: bool, opts: ConvertOptions, report: ConvertReport):
    """Reorder the calibration data so a held-back 1/7 comes last (sequential mode: it chooses
    between the fast and the sequential fit; repair: it early-stops and reverts).  Returns
    ``(data, held for the calibration choice, held for repair)``."""
    chooses = mode in ("sequential", "fit")  # the modes whose fast / sequential pick uses held-back samples
    if data is None or not len(data) or not (chooses or repair) or not opts.holdback:
        return data, 0, 0
    data, held = holdback_split(data)
    if chooses and dist_info()[1] > 1:
        # each process holds back its own samples: the pick between the fast and the sequential fit
        # could then differ from a single process on the union, so it is off under torch.distributed
        # (repair still early-stops on them: its scores are all-reduced, every rank decides alike)
        report.warnings.append("torch.distributed: the held-back comparison of the fast and sequential fits is off "
                               "(every process fits on all of its samples; the result equals one process on the union)")
        return data, 0, held
    return data, held if chooses else 0, held


def _calibrate(work, sites, batches, to, groups, mode, held, opts, progress, report) -> OutputCache | None:
    if batches is None:
        report.warnings.append("no calibration data: replacements are uncalibrated (source gamma/beta copied)")
        uncalibrated(sites, to, groups)
        report.calibrated = False
        return None
    data = batches.data
    passes = max(1, int(opts.passes if opts.passes is not None else (1 if mode == "fast" else 2)))
    report.calib_source, report.calib_samples = data.source, calib_count(data)
    report.calib_labels, report.passes = data.labels is not None, passes
    report.calib_data = data.to_dict() if hasattr(data, "to_dict") else None
    t0 = time.perf_counter()
    if opts.reweight and to in REWEIGHT_TARGETS:
        report.reweight = _reweight(work, sites, batches, to, groups, held, opts, progress).to_dict()
    choice: dict = {}
    cache = calibrate(work, sites, batches, to, groups, passes=passes, target=opts.target, held=held,
                      progress=progress, choice=choice)
    report.calib_seconds = time.perf_counter() - t0
    report.calibration_choice = choice or None
    report.calibrated = True
    return cache


def _reweight(work, sites, batches, to, groups, held, opts, progress=None):
    """Channel reweighting on the calibration samples that are not held back (thinned evenly
    to the moment budget)."""
    from .calibrate import _sub_batches
    from .fit import source_eps
    from .reweight import reweight

    ro = opts.reweight_options
    n = len(batches.data) - int(held)
    part = _sub_batches(batches, 0, n)
    per_sample = 20 * sum(s.channels for s in sites)  # five float32 moments per channel
    cap = max(1, int(ro.moment_budget_bytes) // max(1, per_sample))
    if n > cap:
        part.data = part.data.subset([int(i * n / cap) for i in range(cap)])
    first = Batches(part.data.subset(range(min(2, n))), 2, batches.module, sites)  # the checks' samples
    spec = K.TARGETS[to]
    return reweight(work, sites, part, to, groups,
                    lambda s: spec.eps if spec.eps is not None else source_eps(s), ro, first, progress)


def _training_parts(data, held: int, sites: list[Site]):
    """What the affine fit and repair train on: the calibration samples but the held-back last
    ``held`` (those, or None), and the replacement norm modules."""
    train, heldset = held_parts(data, held)
    replaced = [s.wrapper.new for s in sites if s.wrapper is not None and s.wrapper.new is not None]
    return train, heldset, replaced


def _fit_affine(work, module, data, held, sites, batches, opts, progress, report) -> None:
    """mode="fit": after the closed-form fit, train only the replacements' scale and shift toward the
    original's outputs (:data:`FIT_OPTIONS`, ``opts.fit_epochs`` epochs), kept only when better on the
    held-back calibration samples; its time counts as calibration time."""
    from .repair import repair as run_repair

    train, heldset, replaced = _training_parts(data, held, sites)
    steps = max(1, math.ceil(max(1, opts.fit_epochs) * len(train) / FIT_OPTIONS.batch_size))
    t0 = time.perf_counter()
    with eval_mode(module):
        res = run_repair(work, module, train, heldset, replaced=replaced, to_dev=batches.to_dev, time_budget_s=None,
                         max_steps=steps, opts=copy.deepcopy(FIT_OPTIONS), plain_batch=batches.batch_size,
                         progress=None if progress is None else
                         (lambda _stage, step, total, loss, eta=None: progress("fit", step, total, loss)))
    report.fit = res
    report.calib_seconds = (report.calib_seconds or 0.0) + (time.perf_counter() - t0)
    if res.stopped == "nothing to train":
        return
    if not held:
        report.warnings.append("fit: no calibration samples were held back (fewer than 14, or holdback off), so "
                               "the affine fit was kept unguarded")
    elif not res.kept:
        report.warnings.append("fit: the affine fit did not improve the held-back calibration samples "
                               f"({not_kept_reason(res)}): the closed-form calibration is returned")


def _repair(work, module, data, held, sites, batches, budget, opts, progress, report) -> None:
    from .repair import repair as run_repair

    train, heldset, replaced = _training_parts(data, held, sites)
    if not held:
        report.warnings.append("repair: too few calibration samples to hold some back, so nothing guards "
                               "against a worse model (give at least 14 samples)")
    budget = DEFAULT_REPAIR_BUDGET_S if budget is None else float(budget)
    with eval_mode(module):
        res = run_repair(work, module, train, heldset, replaced=replaced, to_dev=batches.to_dev,
                         time_budget_s=budget, max_steps=opts.repair_steps, opts=opts.repair,
                         progress=progress, plain_batch=batches.batch_size)
    report.repair = res
    if res.kept:
        _measure(work, module, batches, None, report, after_repair=True)
    elif res.stopped == "time budget" and res.steps == 0:
        report.warnings.append(f"repair: the time budget ({res.budget_s:g} s) ran out before its first step "
                               f"(scoring the held-back samples took {res.seconds:.2g} s): the calibrated "
                               "model is returned unchanged")
    elif res.stopped != "nothing to train":
        report.warnings.append("repair did not improve the held-back calibration samples "
                               f"({not_kept_reason(res)}): the calibrated model is returned unchanged")



def _refuse_nonfinite(report: ConvertReport) -> None:
    """A converted model whose outputs are not finite (e.g. a checkpoint with a NaN running
    variance) is refused: nothing is written."""
    for f, what in ((report.fidelity, "calibration"), (report.fidelity_eval, "held-out")):
        bad = sum(o.get("converted_nonfinite", 0) for o in (f.outputs if f is not None else []))
        if bad:
            raise NormswapError(
                f"the converted model's outputs are not finite (NaN/Inf) in {bad} values where the original's "
                f"are finite, on the {what} data: check the model for non-finite weights or running "
                "statistics (nothing was written)")
        if f is not None and f.samples == 0 and getattr(f, "_nonfinite", 0):
            raise NormswapError(
                f"the original model's outputs are not finite (NaN/Inf) for all {f._nonfinite} {what} samples: "
                "nothing to be faithful to; check its weights and running statistics (nothing was written)")


# ================================================================================ the steps

def _check_options(to, mode, groups, batch_size, calib_samples, time_budget_s):
    to = str(to).lower()
    if to not in K.TARGETS:
        raise NormswapError(f"unknown target {to!r}; choose one of {', '.join(K.TARGETS)} "
                            f"(valid pairs: {K.valid_pairs_text()})")
    if mode not in MODES:
        raise NormswapError(f"unknown mode {mode!r}; choose {' or '.join(MODES)}")
    if groups != "auto":
        try:
            groups = int(groups)
        except (TypeError, ValueError):
            raise NormswapError(f"groups must be 'auto' or a positive integer, got {groups!r}") from None
        if groups <= 0:
            raise NormswapError(f"groups must be 'auto' or a positive integer, got {groups}")
    if int(batch_size) <= 0:
        raise NormswapError(f"batch size must be positive, got {batch_size}")
    if calib_samples is not None and int(calib_samples) <= 0:
        raise NormswapError(f"calib samples must be positive, got {calib_samples}")
    if time_budget_s is not None:
        try:
            budget = float(time_budget_s)
        except (TypeError, ValueError):
            raise NormswapError(f"time budget must be a number of seconds, got {time_budget_s!r}") from None
        if not (math.isfinite(budget) and budget > 0):
            raise NormswapError(f"time budget must be a positive, finite number of seconds, got {time_budget_s}")
    return to, groups, int(batch_size)


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
             report: ConvertReport, after_repair: bool = False) -> None:
    """Fidelity of the converted model on the calibration inputs (and its warnings)."""
    with eval_mode(module):
        fid, fwd = fidelity(work, module, batches.data, batches.batch_size, batches.to_dev,
                            cache.tensors if cache is not None else None)
    report.fidelity = fid
    if after_repair:
        return
    report.forward_seconds = fwd
    report.fidelity_calibrated = fid
    if getattr(fid, "_labels_out_of_range", 0):
        report.warnings.append(
            f"{fid._labels_out_of_range} calibration labels are outside the model's output classes: "
            f"no accuracy reported (are they the labels of this model?)")
    chance = chance_warning(fid, "calibration data")
    if chance:
        report.warnings.append(chance)
    if getattr(fid, "_nonfinite", 0):
        report.warnings.append(
            f"the original model's output is not finite (NaN/Inf) for {fid._nonfinite} of "
            f"{fid._nonfinite + fid.samples} calibration samples: fidelity is measured on the other "
            f"{fid.samples} only" + (" (none left: no fidelity numbers)" if not fid.samples else ""))


def _report_layers(sites: list[Site], report: ConvertReport) -> None:
    why = {d["site"]: d["reason"] for d in (report.reweight or {}).get("skipped", [])}
    for s in sites:
        if s.reweight is not None:
            s.method += ", reweighted"
            if s.naive_original is not None:  # the naive swap of the original network, not of the rescaled one
                s.err_naive = s.naive_original
        elif s.name in why:
            s.note = "; ".join(filter(None, [s.note, f"not reweighted: {why[s.name]}"]))
        report.layers.append(LayerFit(
            name=s.name, source_kind=s.kind, source_type=type(s.orig).__name__,
            target_type=type(s.wrapper.new).__name__, channels=s.channels, groups=s.groups,
            method=s.method, calibrated=s.calibrated, err_naive=s.err_naive, err_fitted=s.err_fitted,
            group_errors=s.group_errors, note=s.note))
