"""The torch.export front-end: an ``ExportedProgram`` audited from its aten graph through the
ATen view (:mod:`normswap.views.aten`): the view's sites (norm ops read through
:mod:`normswap.norm_ops`, norm modules lowered to primitive ops found from ``nn_module_stack``,
spectral / weight norms from parameter names), described here, and the planner's verdicts on
that same view -- what ``fold`` does with the program."""

from __future__ import annotations

import torch

from normswap import graph as G
from normswap.norm_ops import bind, op_signature
from normswap.norms import NORMS
from normswap.views.aten import AtenView, qual_type_kind

from .compiled import finish_compiled, reparam_site
from .report import AuditReport, Site, check_tensors, to_float

__all__ = ["audit_export"]


def _arg(sig, node, param: str):
    i = sig.index(param)
    if i is None:
        return None
    return node.args[i] if len(node.args) > i else node.kwargs.get(param)


def _stack_paths(node) -> list[str]:
    return [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _outside_inputs(nodes: list, path: str, ph_to_key: dict):
    """Inputs of a lowered module's nodes that come from outside it (its parameters excluded)."""
    own = {id(n) for n in nodes}
    for n in nodes:
        for a in n.all_input_nodes:
            if id(a) in own or path in _stack_paths(a) or (a.op == "placeholder" and a.name in ph_to_key):
                continue
            yield a


def _op_name(target) -> str:
    n = getattr(target, "__name__", str(target))  # e.g. "batch_norm.default"
    return n.split(".")[0]


def _state(ep):
    sig = ep.graph_signature
    ph_to_key = {}
    for attr in ("inputs_to_parameters", "inputs_to_buffers", "inputs_to_lifted_tensor_constants"):
        ph_to_key.update(getattr(sig, attr, {}) or {})
    state = dict(ep.state_dict)
    state.update(getattr(ep, "constants", {}) or {})
    return ph_to_key, state


def _op_site(vs, ph_to_key: dict, state: dict) -> Site:
    """The record of a site read from its norm op (first call)."""
    node = vs.calls[0]["node"]
    sig = op_signature(node.target)
    args = bind(sig, node.args, node.kwargs)
    mod_path, mod_type = (list((node.meta.get("nn_module_stack") or {}).values()) or [("", "")])[-1]
    kind = vs.kind
    functional = vs.functional is not None
    s = Site(name=vs.name, kind=kind, module_type=_op_name(node.target) if functional else str(mod_type).rsplit(".", 1)[-1],
             functional=functional, region=mod_path.rsplit(".", 1)[0] if "." in mod_path else "")
    tk = qual_type_kind(mod_type) if mod_type and not functional else None
    if tk is not None and tk != kind:
        s.notes.append(f"module class {str(mod_type).rsplit('.', 1)[-1]} (kind {tk}): the graph runs its "
                       f"{kind} op, which is what is planned")
    s.calls = len(vs.calls)
    s.reused = s.calls > 1
    s.onnx_ops = list(NORMS[kind].onnx_ops)

    def tensor_of(a):
        if hasattr(a, "op") and a.op == "placeholder":
            key = ph_to_key.get(a.name)
            if key is not None:
                return state.get(key)
        return None

    stats, params = {}, {}
    for role in ("weight", "bias", "running_mean", "running_var"):
        t = tensor_of(args.get(role))
        if t is not None:
            (stats if role.startswith("running") else params)[role] = t
    _shape_facts(s, sig, node, args)
    has_stats = sig.index("running_mean") is not None or sig.param("training") == "training"
    if not has_stats:
        s.running_stats = False
    else:
        _stat_facts(s, args)
        nbt = state.get(f"{mod_path}.num_batches_tracked") if not functional and mod_path else None
        if isinstance(nbt, torch.Tensor):
            stats["num_batches_tracked"] = nbt
    if not functional and mod_path:
        for k in ("weight", "bias"):
            t = state.get(f"{mod_path}.{k}")
            if isinstance(t, torch.Tensor):
                params.setdefault(k, t)
        w = params.get("weight")
        if isinstance(w, torch.Tensor) and NORMS[kind].layout == "conv":
            s.shape.setdefault("num_features", int(w.shape[0]))
    _neighbours(s, node)
    check_tensors(s, stats, params, s.eps, kind)
    return s


def _shape_facts(s: Site, sig, node, args) -> None:
    shape_arg = _arg(sig, node, "normalized_shape")
    if isinstance(shape_arg, (list, tuple)):
        s.shape = {"normalized_shape": list(shape_arg)}
    groups = _arg(sig, node, "num_groups")
    if isinstance(groups, int):
        s.shape = {"num_groups": groups}
    s.affine = args.get("weight") is not None
    eps = args.get("eps")
    s.eps = to_float(eps) if isinstance(eps, (float, int)) and not isinstance(eps, bool) else None


def _stat_facts(s: Site, args) -> None:
    s.running_stats = args.get("running_mean") is not None
    tr = args.get("training")
    if isinstance(tr, bool):
        s.mode = "train" if tr else "eval"
    if not s.running_stats and s.mode == "train":
        # without running statistics a BatchNorm uses batch statistics in train and eval alike,
        # so training=True in the graph does not say the model was in training mode
        s.mode = None
        s.flag("no_running_stats", "track_running_stats=False: uses batch statistics at eval")
    if s.mode == "train":
        s.flag("train_mode", "training mode: uses batch statistics; ONNX exporters export "
               "inference BatchNorm")


def _neighbours(s: Site, node) -> None:
    inp = node.args[0] if node.args else None
    if hasattr(inp, "op"):
        pop = _op_name(inp.target) if inp.op == "call_function" else inp.op
        pstack = list((inp.meta.get("nn_module_stack") or {}).values())
        kindp = G.producer_op(pop, "input" if inp.op == "placeholder" else "other")
        if pop == "convolution" and len(inp.args) > 6:
            kindp = "conv_transpose" if inp.args[6] else "conv"
        s.producer = {"name": pstack[-1][0] if pstack else inp.name, "op": kindp, "type": pop,
                      "other_users": len(inp.users) > 1}
        s.producer_shared = len(inp.users) > 1
    s.consumers = []
    for u in node.users:
        for v in ([u] if _op_name(u.target) != "getitem" else list(u.users)):
            vstack = list((v.meta.get("nn_module_stack") or {}).values())
            s.consumers.append({"name": (vstack[-1][0] if vstack else "") or v.name,
                                "op": _op_name(v.target) if v.op == "call_function" else v.op, "type": None})


def _lowered_site(ep, vs, state: dict, ph_to_key: dict, nodes_of: dict) -> Site:
    """The record of a norm module lowered to primitive ops (found from ``nn_module_stack``)."""
    path, kind = vs.name, vs.kind
    s = Site(name=path, kind=kind, module_type=vs.type_name, region=path.rsplit(".", 1)[0] if "." in path else "")
    s.onnx_ops = list(NORMS[kind].onnx_ops)
    s.notes.append("found from nn_module_stack (lowered to primitive ops)")
    own = {k[len(path) + 1:]: k for k in list(state) if k.startswith(path + ".") and "." not in k[len(path) + 1:]}
    stats = {n: state[k] for n, k in own.items() if n.startswith("running_") or n == "num_batches_tracked"}
    prm = {n: state[k] for n, k in own.items() if n not in stats}
    w = prm.get("weight")
    if isinstance(w, torch.Tensor):
        s.shape = {"weight_shape": list(w.shape)}
    s.affine = w is not None
    s.running_stats = bool(stats)
    for a in _outside_inputs(nodes_of.get(path, []), path, ph_to_key):
        astack = _stack_paths(a)
        pop = _op_name(a.target) if a.op == "call_function" else a.op
        outside = [u for u in a.users if path not in _stack_paths(u)]
        s.producer = {"name": astack[-1] if astack else a.name,
                      "op": G.producer_op(pop, "input" if a.op == "placeholder" else "other"),
                      "type": pop, "other_users": bool(outside)}
        s.producer_shared = bool(outside)
        break
    check_tensors(s, stats, prm, None, kind)
    return s


def audit_export(ep) -> AuditReport:
    rep = AuditReport(model="ExportedProgram", source="export")
    rep.notes.append("ExportedProgram: audited from its aten graph (best effort)")
    ph_to_key, state = _state(ep)
    nodes_of: dict[str, list] = {}
    for node in ep.graph.nodes:
        for path, _typ in (node.meta.get("nn_module_stack") or {}).values():
            nodes_of.setdefault(path, []).append(node)
    view = AtenView(ep)
    sites: list[Site] = []
    for vs in view.sites():
        if vs.facts.get("reparam"):
            sites.append(reparam_site(vs.name, vs.kind, vs.facts["reparam"]))
        elif vs.facts.get("lowered"):
            sites.append(_lowered_site(ep, vs, state, ph_to_key, nodes_of))
        else:
            sites.append(_op_site(vs, ph_to_key, state))
    return finish_compiled(rep, sites, view)
