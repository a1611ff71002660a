"""The eager front-end: an ``nn.Module`` audited from its FX regions (norm modules, functional
norm calls, spectral / weight norm on producers' weights), optionally run once on example
inputs for input ranks and real call counts.  Per-kind facts come from the registry
(``NORMS[kind]``), functional-call arguments from :mod:`normswap.norm_ops`, fold verdicts from
``normswap.fold.plan``."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from normswap import graph as G
from normswap.fold import plan
from normswap.norm_ops import bind, op_signature
from normswap.norms import NORMS, NormKind, iter_norms, iter_weight_reparams, known_base, norm_shape

from .compiled import apply_verdicts
from .report import AuditReport, Site, check_tensors, to_float

__all__ = ["audit_eager", "module_type_name"]


def module_type_name(module: nn.Module, kind: str) -> str:
    t = type(module)
    name = t.__name__
    if name.startswith("Parametrized") and getattr(module, "parametrizations", None) is not None:
        name = t.__bases__[0].__name__
    if kind == "unsupported_subclass":
        base = known_base(module)
        if base is not None:
            name = f"{name}({base.__name__})"
    return name


def _params(module: nn.Module) -> dict:
    out = {}
    for n, p in module.named_parameters():
        out[n] = p
    for n, b in module.named_buffers():
        if not n.startswith("running_") and not n.endswith("num_batches_tracked") and n not in out \
                and not n.split(".")[-1].startswith("running_"):
            out[n] = b
    return out


def _unwrap(model: Any):
    """LoadedModel -> its module; nn.Module / ScriptModule / ExportedProgram unchanged."""
    ep_type = getattr(getattr(torch, "export", None), "ExportedProgram", None)
    if isinstance(model, nn.Module) or (ep_type is not None and isinstance(model, ep_type)):
        return model
    inner = getattr(model, "module", None)
    if inner is not None and not callable(getattr(type(model), "module", None)):
        return inner
    return model


def _snapshot_buffers(model: nn.Module) -> dict:
    return {k: b.detach().clone() for k, b in model.named_buffers()
            if not isinstance(b, nn.parameter.UninitializedTensorMixin)}


def _restore_buffers(model: nn.Module, saved: dict) -> None:
    with torch.no_grad():
        for k, b in model.named_buffers():
            if k in saved and not isinstance(b, nn.parameter.UninitializedTensorMixin) \
                    and b.shape == saved[k].shape:
                b.copy_(saved[k])


def _has_lazy(model: nn.Module) -> bool:
    return any(isinstance(t, nn.parameter.UninitializedTensorMixin)
               for t in list(model.parameters()) + list(model.buffers()))


def _observe(model: nn.Module, names: list[str], example_inputs) -> tuple[dict, str | None]:
    """Run the model once on example inputs; record input shapes and call counts of the named
    modules.  Buffers are restored afterwards, so a train-mode model is not changed."""
    seen: dict[str, dict] = {n: {"shapes": [], "calls": 0} for n in names}
    handles = []
    mods = dict(model.named_modules())

    def make_hook(name):
        def hook(mod, args, kwargs):
            rec = seen[name]
            rec["calls"] += 1
            first = args[0] if args else next(iter((kwargs or {}).values()), None)
            if isinstance(first, torch.Tensor):
                rec["shapes"].append(list(first.shape))
        return hook

    for n in names:
        if n in mods:
            handles.append(mods[n].register_forward_pre_hook(make_hook(n), with_kwargs=True))
    saved = _snapshot_buffers(model)
    err = None
    try:
        inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        with torch.no_grad():
            model(*inputs)
    except Exception as e:  # noqa: BLE001
        err = f"forward on example inputs failed: {type(e).__name__}: {e}"
    finally:
        for h in handles:
            h.remove()
        _restore_buffers(model, saved)
    return seen, err


def audit_eager(model: nn.Module, example_inputs) -> AuditReport:
    rep = AuditReport(model=type(model).__name__, source="eager")
    regions = G.trace_regions(model)
    rep.regions = [{"path": r.path, "traced": r.gm is not None, "error": r.error,
                    "untraceable_leaves": list(r.untraceable_leaves)} for r in regions]
    for r in regions:
        if r.gm is None:
            rep.notes.append(f"{r.path or '<root>'} analysed without a graph: {r.error}")
    nodes: dict[str, list] = {}  # graph facts for module norms: name -> list of NodeRef
    for name, ref, _kind in G.norm_nodes(regions):
        nodes.setdefault(name, []).append(ref)
    sites = [_module_site(name, mod, kind, regions, nodes.get(name, [])) for name, mod, kind in iter_norms(model)]
    script_sites = _script_sites(model, rep, sites)
    sites += [_reparam_site(site_name, owner, r, regions) for site_name, owner, r in iter_weight_reparams(model)]
    sites += [_functional_site(site_name, ref, kind) for site_name, ref, kind in G.functional_nodes(regions)]
    example_inputs = _observe_inputs(rep, model, sites, example_inputs)
    # the fold verdicts: normswap.fold.plan, the planner fold() itself runs
    saved = _snapshot_buffers(model)
    try:
        decisions = {d.norm: d for d in plan(model, regions, example_inputs=example_inputs)}
    finally:  # the planner may run the model: keep a train-mode model's buffers unchanged
        _restore_buffers(model, saved)
    rep.fold_planner = "normswap.fold.plan"
    apply_verdicts([s for s in sites if s.name not in script_sites], decisions.values())
    apply_verdicts([s for s in sites if s.name in script_sites], (), missing="torchscript_submodule")
    rep.sites = sites
    return rep


def _module_site(name: str, mod: nn.Module, kind: str, regions, refs: list) -> Site:
    desc = NORMS[kind]
    s = Site(name=name, kind=kind, module_type=module_type_name(mod, kind))
    reg = G.region_of(regions, name)
    s.region = reg.path if reg is not None else None
    s.shape = norm_shape(mod, kind)
    s.affine = desc.has_affine(mod)
    s.running_stats = desc.uses_running_stats(mod)
    s.eps = desc.eps(mod)
    s.mode = "train" if mod.training else "eval"
    s.onnx_ops = list(desc.onnx_ops)
    if refs:
        s.graph = True
        s.calls = len(refs)
        s.reused = len(refs) > 1
        s.producer = G.producer_info(refs[0])
        s.producer_shared = bool(s.producer.get("other_users")) or s.producer.get("producer_calls", 1) > 1
        s.consumers = [c for ref in refs for c in G.consumer_info(ref)]
        if len(refs) > 1:
            s.notes.append(f"called at {len(refs)} places")
    elif reg is not None and reg.gm is not None:
        s.graph = True
        s.calls = 0
        s.notes.append("never called in the traced forward (unused module?)")
    else:
        s.graph = False
        s.calls = 1
        s.flags.append("no_graph")
        s.notes.append(f"analysed without a graph (inside untraceable {s.region or '<root>'})")
    # risk flags
    if mod.training and _mode_matters(desc, mod):
        s.flag("train_mode", "training mode: uses batch statistics; both torch ONNX "
               "exporters silently export it as inference BatchNorm (wrong numbers)")
    track = getattr(desc.stat_module(mod), "track_running_stats", None)
    if track is False and desc.mode_sensitive is True and (desc.running_stat_names or known_base(mod)):
        s.flag("no_running_stats", "track_running_stats=False: uses batch statistics at eval")
    check_tensors(s, desc.running_stat_tensors(mod), _params(mod), s.eps, kind)
    return s


def _script_sites(model: nn.Module, rep: AuditReport, sites: list) -> set[str]:
    """TorchScript submodules of an eager model, audited from their own graphs (appended to
    ``sites``); returns their site names."""
    names: set[str] = set()
    paths: list[str] = []
    for path, sub in model.named_modules():
        if not path or not isinstance(sub, torch.jit.ScriptModule) or any(path.startswith(p + ".") for p in paths):
            continue
        paths.append(path)
        try:
            sub_rep = audit_script(sub)
        except Exception as e:  # noqa: BLE001
            rep.notes.append(f"TorchScript submodule {path} not audited: {type(e).__name__}: {e}")
            continue
        rep.notes.append(f"{path} is a TorchScript module: audited from its own graph")
        for ss in sub_rep.sites:
            ss.name = f"{path}.{ss.name}"
            ss.region = f"{path}.{ss.region}" if ss.region else path
            if ss.producer and ss.producer.get("name"):
                ss.producer["name"] = f"{path}.{ss.producer['name']}"
            ss.notes.append("inside a TorchScript submodule")
            names.add(ss.name)
            sites.append(ss)
    return names


def _reparam_site(site_name: str, owner: nn.Module, r, regions) -> Site:
    """A spectral / weight norm on a producer's weight."""
    owner_name = site_name.rsplit(".", 1)[0] if "." in site_name else ""
    s = Site(name=site_name, kind=r.kind, module_type=f"{module_type_name(owner, r.kind)} ({r.api})")
    reg = G.region_of(regions, owner_name)
    s.region = reg.path if reg is not None else None
    s.shape = {"weight_shape": list(getattr(owner, r.param).shape)} if isinstance(
        getattr(owner, r.param, None), torch.Tensor) else {}
    s.affine = False
    s.running_stats = NORMS[r.kind].mode_sensitive is True  # power iteration state (u, v)
    s.eps = to_float(r.details.get("eps")) if r.details.get("eps") is not None else None
    s.mode = "train" if owner.training else "eval"
    s.onnx_ops = list(NORMS[r.kind].onnx_ops)
    s.producer = {"name": owner_name, "op": G.producer_kind(owner),
                  "type": module_type_name(owner, r.kind), "other_users": False}
    s.notes.append(f"{r.api} API; " + ", ".join(f"{k}={v}" for k, v in r.details.items()))
    refs = G.find_module_nodes(regions, owner_name)
    s.graph = bool(refs)
    s.calls = max(1, len(refs))
    s.reused = len(refs) > 1
    if refs:
        s.consumers = [c for ref in refs for c in G.consumer_info(ref)]
    if NORMS[r.kind].mode_sensitive and owner.training:
        s.flag("train_mode", "training mode: power iteration updates u, v (and the weight) "
               "at every forward")
    tensors = {n: t for n, t in list(owner.named_parameters()) + list(owner.named_buffers())
               if n.startswith(r.param) or n.startswith(f"parametrizations.{r.param}")}
    check_tensors(s, {}, tensors, None, r.kind)
    return s


def _functional_site(site_name: str, ref, kind: str) -> Site:
    s = Site(name=site_name, kind=kind, module_type=getattr(ref.node.target, "__name__", str(ref.node.target)),
             functional=True)
    s.region = ref.region.path
    s.onnx_ops = list(NORMS[kind].onnx_ops)
    s.producer = G.producer_info(ref)
    s.producer_shared = bool(s.producer.get("other_users"))
    s.consumers = G.consumer_info(ref)
    _functional_facts(s, ref, kind)
    return s


def _observe_inputs(rep: AuditReport, model: nn.Module, sites: list, example_inputs):
    """Input ranks and real call counts from one run on the example inputs; the inputs the
    planner may use (None when they do not run, or would materialise lazy modules)."""
    if example_inputs is not None and _has_lazy(model):
        rep.notes.append("example inputs not run: the model has uninitialised lazy modules "
                         "(a forward would materialise them)")
        return None
    if example_inputs is None:
        return None
    mod_sites = [s.name for s in sites if not s.functional and NORMS[s.kind].stats != "weight"]
    seen, err = _observe(model, mod_sites, example_inputs)
    if err:
        rep.notes.append(err)
        return None  # inputs that do not run must not reach the fold planner either
    for s in sites:
        rec = seen.get(s.name)
        if rec is None or s.functional:
            continue
        uniq = []
        for sh in rec["shapes"]:
            if sh not in uniq:
                uniq.append(sh)
        s.input_shapes = uniq
        if rec["calls"] > s.calls:
            s.calls = rec["calls"]
            s.reused = True
            if not any(n.startswith("called at") for n in s.notes):
                s.notes.append(f"called {rec['calls']} times per forward")
        if s.module_type == "BatchNorm1d" and any(len(sh) == 3 for sh in uniq):
            s.notes.append("BatchNorm1d on a 3-D input normalises dim 1 (N, C, L)")
    return example_inputs


def _mode_matters(desc: NormKind, mod: nn.Module) -> bool:
    """Does the module's training mode change what it computes (so a train-mode module is a risk)?
    A norm of unknown class counts only when it holds running statistics."""
    if not desc.is_mode_sensitive(mod):
        return False
    if desc.stats == "unknown" and known_base(mod) is None:
        return bool(desc.running_stat_tensors(mod))
    return True


def _functional_facts(s: Site, ref, kind: str) -> None:
    """eps / shape / affine / mode / flags of a functional norm call, read through the op table."""
    node = ref.node
    gm = ref.region.gm
    s.notes.append("functional call")
    sig = op_signature(node.target)
    args = bind(sig, node.args, node.kwargs)

    def attr_tensor(a):
        if isinstance(a, fx.Node) and a.op == "get_attr":
            try:
                obj = gm
                for part in str(a.target).split("."):
                    obj = getattr(obj, part)
                return obj if isinstance(obj, torch.Tensor) else None
            except Exception:
                return None
        return None

    def const(p):
        i = sig.index(p)
        if i is None:
            return None
        v = node.args[i] if len(node.args) > i else node.kwargs.get(p)
        return None if isinstance(v, fx.Node) else v

    shape = const("normalized_shape")
    if isinstance(shape, (list, tuple)) and all(isinstance(v, int) for v in shape):
        s.shape = {"normalized_shape": list(shape)}
    elif isinstance(shape, int):
        s.shape = {"normalized_shape": [shape]}
    groups = const("num_groups")
    if isinstance(groups, int):
        s.shape = {"num_groups": groups}
    stats: dict = {}
    params: dict = {}
    for role, into in (("running_mean", stats), ("running_var", stats), ("weight", params), ("bias", params)):
        t = attr_tensor(args.get(role))
        if t is not None:
            into[role] = t
    if sig.index("weight") is not None:
        s.affine = args.get("weight") is not None
    eps = args.get("eps")
    s.eps = to_float(eps) if eps is not None and not isinstance(eps, fx.Node) else None
    training = args.get("training")
    batch_flag = sig.param("training") == "training"  # a real training flag (not use_input_stats)
    if sig.index("running_mean") is None:
        s.running_stats = False if sig.index("weight") is not None else None
    else:
        s.running_stats = args.get("running_mean") is not None and (batch_flag or training is False)
    if batch_flag and isinstance(training, bool):
        s.mode = "train" if training else "eval"
        if training:
            s.flag("train_mode", "F.batch_norm called with training=True: batch statistics")
    if batch_flag and not s.running_stats:
        s.flag("no_running_stats", "F.batch_norm without running statistics: batch statistics")
    check_tensors(s, stats, params, s.eps, kind)


def audit_script(sm):  # noqa: D103 - late import: script.py imports this module's helpers
    from .script import audit_script as _audit_script

    return _audit_script(sm)
