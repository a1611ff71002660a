"""``plan()`` and ``fold()`` for every front end: a graph view, the one planner, an applier, the
one verification.

* an eager ``nn.Module``: the FX view (:mod:`normswap.views.fx`; sites FX cannot prove on the
  model's export view), applied to a deep copy's modules (:mod:`.apply_eager`);
* a ``torch.export`` program: the ATen view (:mod:`normswap.views.aten`), applied to a copy of
  the program (:mod:`.apply_program`);
* a TorchScript module: the TorchScript view (:mod:`normswap.views.script`) is planned (``plan``,
  ``audit``), but nothing rewrites TorchScript: ``fold`` refuses it and names the eager model.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import time
from typing import Any

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.graph import Region, trace_regions
from normswap.reasons import reason
from normswap.views.aten import AtenView
from normswap.views.fx import FxView, build_view

from .apply_eager import EagerApplier, install
from .apply_program import ProgramApplier
from .bake import bake, reparam_decisions
from .planner import Row, plan_view
from .report import FoldDecision, FoldReport
from .verify import compare_outputs, flat

__all__ = ["plan", "fold", "plan_rows", "FoldDecision", "FoldReport", "deepcopy_model", "compare_outputs",
           "view_of"]


# --------------------------------------------------------------------------- helpers


def _as_inputs(example_inputs) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    return (example_inputs,)


def _any_training(model: nn.Module) -> bool:
    return any(m.training for m in model.modules())


class _Ranks(dict):
    """Input ranks per module id, with ``calls``: how often each module ran in that example run."""

    calls: dict[int, int] | None = None


def _record_ranks(model: nn.Module, inputs: tuple, outputs: list | None = None) -> _Ranks:
    """Input rank of every module call on ``inputs`` (like ShapeProp, across untraceable parts).
    With ``outputs`` (a list), the run's flattened outputs are appended to it."""
    run = deepcopy_model(model) if _any_training(model) else model
    ids = {id(m): id(o) for m, o in zip(run.modules(), model.modules())}
    ranks: dict[int, set[int]] = {}
    counts: dict[int, int] = {}

    def hook(mod, args):
        key = ids.get(id(mod), id(mod))
        counts[key] = counts.get(key, 0) + 1
        if args and isinstance(args[0], torch.Tensor):
            ranks.setdefault(key, set()).add(args[0].dim())

    handles = [m.register_forward_pre_hook(hook) for m in run.modules()]
    try:
        with torch.no_grad():
            y = run(*inputs)
        if outputs is not None:
            outputs.extend(flat(y))
    except Exception as e:  # noqa: BLE001
        raise NormswapError(f"the example inputs do not run through the model: {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    out = _Ranks(ranks)
    out.calls = counts
    return out


def deepcopy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works with the legacy ``weight_norm`` / ``spectral_norm``
    hooks (their computed ``weight`` attribute is a non-leaf tensor deepcopy refuses): the
    computed attribute is detached for the copy (it is recomputed on every forward).  Every
    module of the copy keeps the original's train/eval flag (:func:`_same_modes`)."""
    return _same_modes(model, _deepcopy(model))


def _same_modes(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give each module of the copy ``dst`` the train/eval mode of the module of ``src`` with the
    same name (parents first, through the module's own ``train()``).  torchvision's
    ``DualGraphModule`` (``create_feature_extractor``; timm's ``features_only=True,
    feature_cls="fx"``) re-runs its ``__init__`` when deep-copied, which puts the copy and all its
    submodules in training mode with the *train* graph: the copy of an eval model computed batch
    statistics.  Its ``train(False)`` swaps the eval graph back in."""
    flags = {name: m.training for name, m in src.named_modules(remove_duplicate=False)}
    for name, m in dst.named_modules(remove_duplicate=False):  # pre-order: a parent before its children
        want = flags.get(name)
        if want is not None and m.training != want:
            m.train(want)
    return dst


def _deepcopy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except RuntimeError:
        pass
    saved = []
    for m in model.modules():
        for k, v in list(vars(m).items()):
            if isinstance(v, torch.Tensor) and not v.is_leaf:
                saved.append((m, k, v))
                setattr(m, k, v.detach())
    try:
        return copy.deepcopy(model)
    finally:
        for m, k, v in saved:
            setattr(m, k, v)


def _evaled(model: nn.Module) -> nn.Module:
    m = deepcopy_model(model)
    m.eval()
    return m


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector while copying / tracing / rewriting a model (its full
    collections scan every live object, which makes large models fold in superlinear time)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _as_program(model):
    """The ExportedProgram ``model`` is (or a LoadedModel holds), else None."""
    if isinstance(model, torch.export.ExportedProgram):
        return model
    ep = getattr(model, "module", None) if hasattr(model, "format") else None  # a LoadedModel
    return ep if isinstance(ep, torch.export.ExportedProgram) else None


def _as_script(model):
    m = getattr(model, "module", None) if hasattr(model, "format") else model
    return m if isinstance(m, torch.jit.ScriptModule) else None


def _decisions(rows: list[Row]) -> list[FoldDecision]:
    return [r.decision for r in rows]


# --------------------------------------------------------------------------- views


def view_of(model, *, example_inputs=None, regions: list[Region] | None = None):
    """The graph view ``plan`` / ``fold`` / ``audit`` use for ``model`` (any front end)."""
    program = _as_program(model)
    if program is not None:
        return AtenView(program)
    script = _as_script(model)
    if script is not None:
        from normswap.views.script import ScriptView

        return ScriptView(script)
    ex = _as_inputs(example_inputs)
    regions = trace_regions(model) if regions is None else regions
    ranks = _record_ranks(model, ex) if ex is not None else None
    return build_view(model, regions, ranks, example_inputs=ex)


def plan_rows(view) -> list[Row]:
    """The planner's rows for a view (nothing applied)."""
    return plan_view(view)


# --------------------------------------------------------------------------- public API


def plan(model, regions: list[Region] | None = None, *, example_inputs=None, eval: bool = False,
         bake_spectral_norm: bool = False, bake_weight_std: bool = False) -> list[FoldDecision]:
    """What :func:`fold` would do with each norm site of ``model`` (not modified).

    One :class:`FoldDecision` per site of the model's graph view (module norms, functional norm
    calls, spectral / weight norms); ``reason is None`` means foldable.  ``regions`` (from
    ``graph.trace_regions(model)``) saves a trace; ``example_inputs`` give input ranks and prove
    what FX cannot (on a torch.export graph); ``eval``/``bake_*`` as in :func:`fold`.  A
    TorchScript module is planned on its own graph (foldable = folds in the eager model).
    """
    if _as_program(model) is not None or _as_script(model) is not None:
        return _decisions(plan_view(view_of(model)))
    from normswap.io import as_module

    model = as_module(model, require_eager=True) if not isinstance(model, nn.Module) else model
    reparams = reparam_decisions(model if not eval else _evaled(model), bake_spectral_norm, bake_weight_std)
    work = model
    if (bake_spectral_norm or bake_weight_std) and any(d.reason is None for d in reparams):
        work = _evaled(model) if eval else deepcopy_model(model)
        bake(work, None, bake_spectral_norm, bake_weight_std)
        regions = None
    elif eval and _any_training(model):
        work = _evaled(model)
        regions = None
    view = view_of(work, example_inputs=example_inputs, regions=regions)
    return _decisions(plan_view(view)) + reparams


def fold(model: nn.Module, example_inputs: Any = None, *, eval: bool = False,
         bake_spectral_norm: bool = False, inplace: bool = False,
         bake_weight_std: bool = False) -> tuple[nn.Module, FoldReport]:
    """Fold every norm that can be folded exactly; skip (with a reason) every other one.

    Returns ``(folded_model, FoldReport)``.  The folded model keeps the user's module classes
    and names: producers' weights/biases are replaced and a folded norm becomes ``nn.Identity``
    (LayerNorm/RMSNorm/GroupNorm keep their class with an identity affine).  Only where a
    functional ``batch_norm`` call was removed does a region become a ``GraphModule``.
    ``model`` is not modified unless ``inplace=True``.  ``eval=True`` switches to eval mode
    first (reported); otherwise a model in training mode folds nothing.
    ``example_inputs`` give input ranks (Linear -> BatchNorm1d), prove what FX cannot trace (on a
    torch.export graph) and verify the result.  A ``torch.export`` program is folded in its own
    graph (:func:`fold_program`).
    """
    program = _as_program(model)
    if program is not None:
        if bake_spectral_norm or bake_weight_std:
            raise NormswapError("baking a weight reparametrisation inside an exported program is not supported: "
                                "bake it in the eager model, then export")
        return fold_program(program, example_inputs, eval=eval)
    with _gc_paused():
        return _fold(model, example_inputs, eval=eval, bake_spectral_norm=bake_spectral_norm, inplace=inplace,
                     bake_weight_std=bake_weight_std)


def _report_rows(report: FoldReport, rows: list[Row], reparams=()) -> None:
    for d in [r.decision for r in rows] + list(reparams):
        if d.reason is None:
            report.folded.append({"norm": d.norm, "kind": d.kind, "into": d.into, "pattern": d.pattern})
        else:
            report.skipped.append({"norm": d.norm, "kind": d.kind, "reason": str(d.reason), "code": d.code})


def _prepare(model, example_inputs, report, *, eval, inplace, bake_spectral_norm, bake_weight_std):
    """The working copy (eval / baked), its reference outputs and ranks, and the reparam rows."""
    from normswap.io import as_module

    if not isinstance(model, nn.Module):
        model = as_module(model, require_eager=True)
    if isinstance(model, torch.jit.ScriptModule):
        raise NormswapError("cannot fold a TorchScript module: load the eager model instead")
    work = model if inplace else deepcopy_model(model)
    if eval and _any_training(work):
        work.eval()
        report.switched_to_eval = True
        report.notes.append("switched the model to eval mode before folding (eval=True)")
    ex = _as_inputs(example_inputs)
    reparams = reparam_decisions(work, bake_spectral_norm, bake_weight_std)
    baking = (bake_spectral_norm or bake_weight_std) and any(d.reason is None for d in reparams)
    ref_out, ranks = None, None
    if ex is not None and not _any_training(work):
        # one forward pass gives the reference outputs and the input ranks (a bake replaces
        # modules, so their ranks are recorded after it, in a second pass)
        ref_out = []
        recorded = _record_ranks(work, ex, ref_out)
        ranks = None if baking else recorded
    if baking:
        bake(work, report, bake_spectral_norm, bake_weight_std)
    if ranks is None and ex is not None:
        ranks = _record_ranks(work, ex)
    return work, ex, ref_out, ranks, reparams


def _fold(model, example_inputs, *, eval, bake_spectral_norm, inplace, bake_weight_std=False):
    report = FoldReport(inplace=inplace)
    work, ex, ref_out, ranks, reparams = _prepare(model, example_inputs, report, eval=eval, inplace=inplace,
                                                  bake_spectral_norm=bake_spectral_norm,
                                                  bake_weight_std=bake_weight_std)
    regions = trace_regions(work)
    view: FxView = build_view(work, regions, ranks, example_inputs=ex)
    view.applier = EagerApplier(view)
    rows = plan_view(view, apply=True)
    _report_rows(report, rows, reparams)
    n_export = sum(1 for r in rows if r.match is not None and r.match.data.get("graph") == "torch.export")
    if n_export:
        report.notes.append(f"{n_export} norm affine(s) folded where FX could not trace: proven on a "
                            f"torch.export (non-strict) graph of the example inputs")
    if view.rewritten:
        work = install(view, work)
        report.graph_rewritten = sorted(r.path for r in view.rewritten.values())
        report.returns_graph_module = "" in report.graph_rewritten
        where = ", ".join(repr(p or "<model>") for p in report.graph_rewritten)
        report.notes.append(f"functional batch_norm calls were removed: {where} became torch.fx.GraphModule")
    if ref_out is not None:
        with torch.no_grad():
            out = flat(work(*ex))
        report.verification = compare_outputs(ref_out, out)
        if report.verification.get("reason") == "no finite values to compare":
            report.notes.append("the verification compared nothing: the model's outputs on the example inputs "
                                "are all NaN/Inf")
        if not report.verification["ok"]:
            report.notes.append("the folded model's outputs differ from the original's on the example inputs")
    return work, report


# --------------------------------------------------------------------------- exported programs


def _program_inputs(ep, example_inputs):
    if example_inputs is None:
        ex = getattr(ep, "example_inputs", None)
        if ex is None:
            return None
        args, kwargs = ex
        return tuple(args), dict(kwargs or {})
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[1], dict) \
            and isinstance(example_inputs[0], (tuple, list)):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _run(ep, args, kwargs):
    with torch.no_grad():
        return flat(ep.module()(*args, **kwargs))


def fold_program(ep, example_inputs=None, *, eval: bool = False):
    """Fold every norm of an ``ExportedProgram`` that can be folded exactly in its own graph; skip
    every other one with a reason naming the site.  Returns ``(folded_program, FoldReport)``; ``ep``
    is not modified.  ``example_inputs`` (a tensor, a tuple of positional inputs, or ``(args,
    kwargs)``; default: the program's own) verify the result: when the folded program's outputs
    differ, the original program is returned unchanged with a failed verification.  ``eval=True``
    cannot change the mode a program was exported in: train-mode BatchNorms are refused either way.
    """
    if not isinstance(ep, torch.export.ExportedProgram):
        raise NormswapError(f"fold_program needs a torch.export.ExportedProgram, got {type(ep).__name__}")
    report = FoldReport()
    t0 = time.perf_counter()
    view = AtenView(ep, eval_requested=eval)
    view.applier = ProgramApplier(ep)
    rows = plan_view(view, apply=True)
    _report_rows(report, rows)
    if eval and any(r.decision.code == "program_training" for r in rows):
        report.notes.append("eval=True: an exported program keeps the mode it was exported in; "
                            "re-export the model after model.eval() to fold its BatchNorms")
    result, removed = view.applier.finish()
    if removed:
        report.notes.append(f"removed {len(removed)} unused parameters/buffers of folded BatchNorms "
                            f"from the program's state")
    _verify_program(ep, result, example_inputs, report)
    if report.verification is not None and not report.verification["ok"]:
        result = ep
    report.notes.append(f"folded the exported program's graph in {time.perf_counter() - t0:.3f} s")
    return result, report


def _verify_program(ep, result, example_inputs, report: FoldReport) -> None:
    ex = _program_inputs(ep, example_inputs)
    if ex is None:
        report.notes.append("no example inputs (and none stored in the program): not verified")
        return
    if not report.folded:
        return
    try:
        ref = _run(ep, *ex)
    except Exception as e:  # noqa: BLE001
        raise NormswapError(f"the example inputs do not run through the program: {type(e).__name__}: {e}") from e
    try:
        v = compare_outputs(ref, _run(result, *ex))
    except Exception as e:  # noqa: BLE001
        v = {"max_abs_error": None, "ok": False, "error": f"{type(e).__name__}: {e}"}
    report.verification = v
    if not v["ok"]:
        report.notes.append("the folded program's outputs differ from the original's on the example "
                            "inputs: the original program is returned unchanged")
        r = reason("verification_failed")
        for f in report.folded:
            report.skipped.append({"norm": f["norm"], "kind": f["kind"], "reason": str(r), "code": r.code})
        report.folded = []
