"""``plan()`` and ``fold()``: fold = plan + apply, in rounds.

``plan`` finds every norm site (module norms over all traced regions, functional
``batch_norm`` calls, spectral/weight norms on producers' weights) and asks the rule set
(:data:`normswap.fold.rules.RULES`) in order; the first rule whose ``match`` succeeds folds
the site, otherwise the site is skipped with the rules' reasons.  A folded norm's call then
acts as the identity, which can make a neighbour foldable (``conv -> bn -> bn``): planning
repeats on the sites still skipped, without re-tracing, while the previous round folded
something.  ``fold`` works on a deep copy (unless ``inplace``), optionally switches to eval
and bakes spectral norms, then plans and applies round by round (each match reads the
layer's current weights, so folds into both sides of a layer compose).
"""

from __future__ import annotations

import contextlib
import copy
import gc
from typing import Any

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.graph import Region, functional_nodes, trace_regions
from normswap.norms import is_composite, iter_norms, iter_weight_reparams

from .core import Ctx, Match, Site, build_ctx, describe_node, family, norm_problem
from .report import FoldDecision, FoldReport
from .rules import RULES

__all__ = ["plan", "fold", "FoldDecision", "FoldReport"]


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


def _record_ranks(model: nn.Module, inputs: tuple, outputs: list | None = None) -> dict[int, set[int]]:
    """Input rank of every module call on ``inputs`` (like ShapeProp, across untraceable parts).
    With ``outputs`` (a list), the run's flattened outputs are appended to it: one forward pass
    gives both the reference outputs and the ranks."""
    run = deepcopy_model(model) if _any_training(model) else model
    ids = {id(m): id(o) for m, o in zip(run.modules(), model.modules())}
    ranks: dict[int, set[int]] = {}
    counts: dict[int, int] = {}
    handles = []

    def hook(mod, args):
        key = ids.get(id(mod), id(mod))
        counts[key] = counts.get(key, 0) + 1
        if args and isinstance(args[0], torch.Tensor):
            ranks.setdefault(key, set()).add(args[0].dim())

    for m in run.modules():
        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            y = run(*inputs)
        if outputs is not None:
            outputs.extend(_flat(y))
    except Exception as e:  # noqa: BLE001
        raise NormswapError(f"the example inputs do not run through the model: {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    out = _Ranks(ranks)
    out.calls = counts
    return out


class _Ranks(dict):
    """Input ranks per module id, with ``calls``: how often each module ran in that example run."""

    calls: dict[int, int] | None = None


def _sites(model: nn.Module, regions: list[Region], ctx: Ctx) -> list[Site]:
    sites = [Site(name, kind, mod, list(ctx.calls_of(mod))) for name, mod, kind in iter_norms(model)]
    for name, ref, kind in functional_nodes(regions):
        sites.append(Site(name, kind, None, [], functional=ref))
    return sites


def _first_input(site: Site, ctx: Ctx) -> str:
    for ref in site.calls:
        if ref.node.args:
            return describe_node(ref.region, ctx.input_of(ref.node, True) or ref.node.args[0])
    return "unknown"


def _decide(site: Site, ctx: Ctx) -> tuple[FoldDecision, Any, Match | None]:
    kind = f"functional_{site.kind}" if site.functional is not None else site.kind
    rules = [r for r in RULES if r.applies(site, ctx)]
    reasons: list[str] = []
    for rule in rules:
        m = rule.match(site, ctx)
        if isinstance(m, Match):
            return FoldDecision(site.name, kind, ", ".join(m.into), m.pattern), rule, m
        if m not in reasons:
            reasons.append(m)
    return FoldDecision(site.name, kind, reason=_skip_reason(site, ctx, rules, reasons)), None, None


def _skip_reason(site: Site, ctx: Ctx, rules: list, reasons: list[str]) -> str:
    """One reason for a site no rule folds, from the rules' reasons."""
    if site.functional is not None:
        return reasons[0]
    if not rules:
        return norm_problem(site, ctx) or f"no fold rule for {site.kind}"
    if is_composite(site.kind):
        return (f"its conditional affine depends on a second input; its BatchNorm statistics "
                f"were not folded either: {reasons[0]}")
    common = norm_problem(site, ctx)
    if common:
        return common
    if family(site.kind) == "bn_like" and not any(r.PRODUCER for r in rules):
        return (f"nothing foldable before it (its input is {_first_input(site, ctx)}); "
                f"after it: {reasons[-1]}")
    if len(reasons) > 1:
        return f"{reasons[0]}; after it: {'; '.join(reasons[1:])}"
    return reasons[0]


def _reparam_decisions(model: nn.Module, bake: bool, bake_ws: bool = False) -> list[FoldDecision]:
    out = []
    for site_name, mod, r in iter_weight_reparams(model):
        owner = site_name.rsplit(".", 1)[0] if "." in site_name else ""
        if r.kind == "spectral":
            if not bake:
                reason = "spectral norm: pass bake_spectral_norm=True / --bake-spectral-norm to bake W/sigma"
            elif mod.training:
                reason = "the module is in training mode (its spectral norm iterates): pass eval=True / --eval"
            elif r.api == "parametrization" and len(mod.parametrizations[r.param]) != 1:
                reason = "other parametrizations on the same weight"
            else:
                reason = None
        elif r.kind == "weight_std":
            if not bake_ws:
                reason = ("weight standardization: pass bake_weight_std=True / --bake-weight-std to bake "
                          "the standardised weight into a plain Conv2d")
            elif type(mod).__name__.endswith("Same") or getattr(mod, "pad", None) is not None:
                reason = (f"{type(mod).__name__}: its 'same' padding depends on the input size, so it "
                          f"cannot become a plain Conv2d")
            elif mod._forward_hooks or mod._forward_pre_hooks:
                reason = "the conv has hooks registered"
            else:
                reason = None
        else:
            reason = f"{r.kind}: not baked (only spectral norm and weight standardization are)"
        pattern = "bake_weight_std" if r.kind == "weight_std" else "bake_spectral_norm"
        out.append(FoldDecision(site_name, r.kind, owner if reason is None else None,
                                pattern if reason is None else None, reason))
    return out


def _bake_weight_std(work: nn.Module, mod: nn.Module) -> None:
    """Replace a weight-standardised conv (timm StdConv2d / ScaledStdConv2d) by an ``nn.Conv2d``
    holding the standardised weight, computed in float64 exactly as its forward does
    (per output channel: biased variance, ``eps``; times ``gain * scale`` when scaled)."""
    w = mod.weight.detach().to(torch.float64)
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    std_w = (flat - mean) / torch.sqrt(var + float(mod.eps))
    gain = getattr(mod, "gain", None)
    if isinstance(gain, torch.Tensor):
        std_w = std_w * (gain.detach().to(torch.float64).reshape(-1, 1) * float(mod.scale))
    new = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                    dilation=mod.dilation, groups=mod.groups, bias=mod.bias is not None,
                    padding_mode=mod.padding_mode, device=mod.weight.device, dtype=mod.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(std_w.reshape(w.shape).to(mod.weight.dtype))
        if mod.bias is not None:
            new.bias.copy_(mod.bias.detach())
    new.train(mod.training)
    for name, m in list(work.named_modules(remove_duplicate=False)):
        if m is mod and name:
            parent_name, _, leaf = name.rpartition(".")
            setattr(work.get_submodule(parent_name) if parent_name else work, leaf, new)


def _plan(model, regions, ranks, allow_training, apply: bool = False, example_inputs=None):
    """Decide every site; while a round folded something, mark its norms' calls as the
    identity (applying the matches first when ``apply``) and decide the sites still skipped
    again.  Returns the context and one (site, decision, rule, match) row per site.
    ``example_inputs`` (a tuple): sites FX cannot prove are proven on a torch.export graph."""
    ctx = build_ctx(model, regions, ranks, allow_training)
    ctx.example_inputs = example_inputs  # issue 11: normswap.fold.export_graph
    rows = [(site, *_decide(site, ctx)) for site in _sites(model, regions, ctx)]
    pending = list(range(len(rows)))
    while True:
        folded = [i for i in pending if rows[i][2] is not None]
        if not folded:
            break
        for i in folded:
            site, _, rule, m = rows[i]
            if apply:
                rule.apply(site, ctx, m)
            ctx.removed.update(id(n) for n in rule.removed_nodes(site, m))
        pending = [i for i in pending if rows[i][2] is None]
        for i in pending:
            rows[i] = (rows[i][0], *_decide(rows[i][0], ctx))
    return ctx, rows


# --------------------------------------------------------------------------- public API


def plan(model: nn.Module, regions: list[Region] | None = None, *, example_inputs=None,
         eval: bool = False, bake_spectral_norm: bool = False, bake_weight_std: bool = False) -> list[FoldDecision]:
    """What :func:`fold` would do with each norm site of ``model`` (not modified).

    One :class:`FoldDecision` per module norm (``iter_norms`` order), per functional norm call
    and per spectral/weight norm; ``reason is None`` means foldable.  ``regions`` (from
    ``graph.trace_regions(model)``) saves a trace; ``example_inputs`` give input ranks
    (needed for Linear -> BatchNorm1d); ``eval``/``bake_spectral_norm`` as in :func:`fold`.
    """
    from normswap.io import as_module

    program = _as_program(model)
    if program is not None:
        from .program import plan_program

        return [FoldDecision(s.norm, s.kind, s.into, s.pattern, s.reason) for s in plan_program(program)]
    model = as_module(model, require_eager=True) if not isinstance(model, nn.Module) else model
    reparams = _reparam_decisions(model if not eval else _evaled(model), bake_spectral_norm, bake_weight_std)
    work = model
    if (bake_spectral_norm or bake_weight_std) and any(d.reason is None for d in reparams):
        work = _evaled(model) if eval else deepcopy_model(model)
        _bake(work, None, bake_spectral_norm, bake_weight_std)
        regions = None
    elif eval and _any_training(model):
        work = _evaled(model)
        regions = None
    ex = _as_inputs(example_inputs)
    if regions is None:
        regions = trace_regions(work)
    ranks = _record_ranks(work, ex) if ex is not None else None
    _, rows = _plan(work, regions, ranks, allow_training=False, example_inputs=ex)
    return [d for _, d, _, _ in rows] + reparams


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


def _bake(work: nn.Module, report: FoldReport | None, spectral: bool = True, weight_std: bool = False) -> None:
    from torch.nn.utils import parametrize

    for d in _reparam_decisions(work, spectral, weight_std):
        if d.reason is not None or (d.kind == "spectral" and not spectral):
            continue
        owner, _, pname = d.norm.rpartition(".")
        mod = work.get_submodule(owner) if owner else work
        api = None
        if d.kind == "weight_std":
            _bake_weight_std(work, mod)
            if report is not None:
                report.baked.append({"norm": d.norm, "into": d.into, "api": "forward"})
            continue
        if getattr(mod, "parametrizations", None) is not None and pname in mod.parametrizations:
            api = "parametrization"
            mod.parametrizations[pname].eval()  # no power-iteration step while removing
            # remove_parametrizations deletes the property from the module's class, which a
            # deepcopy shares with the user's model: give this module a class of its own
            cls = type(mod)
            mod.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            parametrize.remove_parametrizations(mod, pname, leave_parametrized=True)
        else:
            api = "hook"
            torch.nn.utils.remove_spectral_norm(mod, pname)
        if report is not None:
            report.baked.append({"norm": d.norm, "into": d.into, "api": api})


def compare_outputs(ref: list[torch.Tensor], out: list[torch.Tensor]) -> dict:
    """The verification of a fold: ``{"max_abs_error", "max_abs_output", "ok"}`` (+ ``"reason"``).
    Floating outputs agree within ``1e-4 * (1 + max|y|)`` (``2e-2`` below float32), with NaN/Inf in
    the same places; other outputs exactly.  Nothing finite to compare is a failure, never 0."""
    err, scale = 0.0, 0.0
    compared, floating = 0, 0
    ok = len(out) == len(ref)
    for a, b in zip(ref, out):
        if a.shape != b.shape:
            ok = False
            continue
        if a.is_floating_point():
            low_precision = a.dtype not in (torch.float32, torch.float64)
            a, b = a.double(), b.double()
            fin = torch.isfinite(a)
            if not torch.equal(fin, torch.isfinite(b)) or not torch.equal(a[~fin].nan_to_num(), b[~fin].nan_to_num()):
                ok = False  # NaN / Inf in different places
            a, b = a[fin], b[fin]
            floating += 1
            compared += a.numel()
            err = max(err, float((a - b).abs().max()) if a.numel() else 0.0)
            scale = max(scale, float(a.abs().max()) if a.numel() else 0.0)
            ok = ok and err <= (2e-2 if low_precision else 1e-4) * (1 + scale)
        else:
            ok = ok and bool((a == b).all())
    if floating and not compared:  # all NaN/Inf: nothing was proven
        return {"max_abs_error": float("nan"), "max_abs_output": float("nan"), "ok": False,
                "reason": "no finite values to compare"}
    return {"max_abs_error": err, "max_abs_output": scale, "ok": ok}


def _flat(out) -> list[torch.Tensor]:
    from normswap.onnx_utils import flatten_outputs  # the tensors of a (nested) output, one definition

    return flatten_outputs(out)


def _install(ctx: Ctx, regions: list[Region], model: nn.Module) -> nn.Module:
    """Put each rewritten region's GraphModule in place of its module (deepest first)."""
    rewritten = sorted(ctx.rewritten.values(), key=lambda r: -len(r.path))
    for region in rewritten:
        gm = region.gm
        for node in gm.graph.nodes:  # modules replaced in the model since tracing
            if node.op != "call_module":
                continue
            target = str(node.target)
            try:
                cur = region.module.get_submodule(target)
            except AttributeError:
                continue
            parent, _, leaf = target.rpartition(".")
            holder = gm.get_submodule(parent) if parent else gm
            if getattr(holder, leaf, None) is not cur:
                setattr(holder, leaf, cur)
        gm.recompile()
        # GraphModule() makes the root and its path containers fresh modules (training=True)
        originals = {id(m) for m in region.module.modules()}
        for m in gm.modules():
            if id(m) not in originals:
                m.training = region.module.training
        if region.path == "":
            model = gm
        else:
            for name in ctx.names.get(id(region.module), [region.path]):
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, gm)
    return model


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector while copying/tracing/rewriting a model: its
    full collections scan every live object, which makes large models fold in superlinear time
    (the memory is still freed by reference counting; cycles are collected afterwards)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


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
    ``example_inputs`` give input ranks (Linear -> BatchNorm1d) and a verification run.
    """
    program = _as_program(model)
    if program is not None:  # a torch.export program: folded in its own graph (normswap.fold.program)
        if bake_spectral_norm or bake_weight_std:
            raise NormswapError("baking a weight reparametrisation inside an exported program is not supported: "
                                "bake it in the eager model, then export")
        from .program import fold_program

        return fold_program(program, example_inputs, eval=eval)
    with _gc_paused():
        return _fold(model, example_inputs, eval=eval, bake_spectral_norm=bake_spectral_norm, inplace=inplace,
                     bake_weight_std=bake_weight_std)


def _as_program(model):
    """The ExportedProgram ``model`` is (or a LoadedModel holds), else None."""
    if isinstance(model, torch.export.ExportedProgram):
        return model
    ep = getattr(model, "module", None) if hasattr(model, "format") else None  # a LoadedModel
    return ep if isinstance(ep, torch.export.ExportedProgram) else None


def _fold(model, example_inputs, *, eval, bake_spectral_norm, inplace, bake_weight_std=False):
    from normswap.io import as_module

    if not isinstance(model, nn.Module):
        model = as_module(model, require_eager=True)
    if isinstance(model, torch.jit.ScriptModule):
        raise NormswapError("cannot fold a TorchScript module: load the eager model instead")
    report = FoldReport(inplace=inplace)
    work = model if inplace else deepcopy_model(model)
    if eval and _any_training(work):
        work.eval()
        report.switched_to_eval = True
        report.notes.append("switched the model to eval mode before folding (eval=True)")
    ex = _as_inputs(example_inputs)
    ref_out = None
    can_run = ex is not None and not _any_training(work)
    reparams = _reparam_decisions(work, bake_spectral_norm, bake_weight_std)
    baking = (bake_spectral_norm or bake_weight_std) and any(d.reason is None for d in reparams)
    ranks = None
    if can_run:
        # one forward pass of the original gives the reference outputs and the input ranks
        # (a bake replaces modules, so their ranks are recorded after it, in a second pass)
        ref_out = []
        recorded = _record_ranks(work, ex, ref_out)
        ranks = None if baking else recorded
    if baking:
        _bake(work, report, bake_spectral_norm, bake_weight_std)
    regions = trace_regions(work)
    if ranks is None and ex is not None:
        ranks = _record_ranks(work, ex)
    ctx, rows = _plan(work, regions, ranks, allow_training=False, apply=True, example_inputs=ex)
    for site, d, rule, m in rows:
        if rule is None:
            report.skipped.append({"norm": d.norm, "kind": d.kind, "reason": d.reason})
            continue
        report.folded.append({"norm": d.norm, "kind": d.kind, "into": d.into, "pattern": d.pattern})
    for d in reparams:
        if d.reason is None:
            report.folded.append({"norm": d.norm, "kind": d.kind, "into": d.into, "pattern": d.pattern})
        else:
            report.skipped.append({"norm": d.norm, "kind": d.kind, "reason": d.reason})
    n_export = sum(1 for _, _, _, m in rows if m is not None and m.data.get("graph") == "torch.export")
    if n_export:  # issue 11
        report.notes.append(f"{n_export} norm affine(s) folded where FX could not trace: proven on a "
                            f"torch.export (non-strict) graph of the example inputs")
    if ctx.rewritten:
        work = _install(ctx, regions, work)
        report.graph_rewritten = sorted(r.path for r in ctx.rewritten.values())
        report.returns_graph_module = "" in report.graph_rewritten
        where = ", ".join(repr(p or "<model>") for p in report.graph_rewritten)
        report.notes.append(f"functional batch_norm calls were removed: {where} became torch.fx.GraphModule")
    if ref_out is not None:
        with torch.no_grad():
            out = _flat(work(*ex))
        report.verification = compare_outputs(ref_out, out)
        ok = report.verification["ok"]
        if report.verification.get("reason") == "no finite values to compare":
            report.notes.append("the verification compared nothing: the model's outputs on the example inputs "
                                "are all NaN/Inf")
        if not ok:
            report.notes.append("the folded model's outputs differ from the original's on the example inputs")
    return work, report
