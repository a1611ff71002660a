"""The torch.export front-end: an ``ExportedProgram`` audited from its aten graph -- norm ops
read through :mod:`normswap.norm_ops`, norm modules lowered to primitive ops found from
``nn_module_stack``, producers through the one producer table (:mod:`normswap.graph`)."""

from __future__ import annotations

from typing import Any

import torch

from normswap import graph as G
from normswap.norm_ops import bind, op_signature
from normswap.norms import NORMS

from .compiled import finish_compiled, qual_type_kind, reparam_sites_from_names
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


def _node_desc(node) -> str:
    """A node described as the eager fold rules describe FX nodes (a module's op as the module)."""
    if node.op == "output":
        return "the graph output"
    if node.op == "placeholder":
        return "an input of the model"
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if stack:
        path, typ = stack[-1]
        return f"'{path}' ({str(typ).rsplit('.', 1)[-1]})"
    return f"'{_op_name(node.target)}' ({node.op})"


def _node_op(node) -> str:
    if node.op == "output":
        return "output"
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if stack:
        return G.producer_op(str(stack[-1][1]))
    return G.producer_op(_op_name(node.target)) if node.op == "call_function" else node.op


def _op_name(target) -> str:
    n = getattr(target, "__name__", str(target))  # e.g. "batch_norm.default"
    return n.split(".")[0]


def audit_export(ep) -> AuditReport:
    rep = AuditReport(model="ExportedProgram", source="export")
    rep.notes.append("ExportedProgram: audited from its aten graph (best effort)")
    sig = ep.graph_signature
    ph_to_key = {}
    for attr in ("inputs_to_parameters", "inputs_to_buffers", "inputs_to_lifted_tensor_constants"):
        ph_to_key.update(getattr(sig, attr, {}) or {})
    state = dict(ep.state_dict)
    state.update(getattr(ep, "constants", {}) or {})

    def tensor_of(a):
        if hasattr(a, "op") and a.op == "placeholder":
            key = ph_to_key.get(a.name)
            if key is not None:
                return key, state.get(key)
        return None, None

    sites: list[Site] = []
    extras: dict[str, dict] = {}
    used_names: dict[str, int] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        sig = op_signature(node.target)
        if sig is None:
            continue
        op = _op_name(node.target)
        kind = op_kind = sig.kind  # what the aten op computes (the module may be a subclass)
        args = bind(sig, node.args, node.kwargs)
        stack = node.meta.get("nn_module_stack") or {}
        entries = list(stack.values())
        mod_path, mod_type = (entries[-1] if entries else ("", ""))
        type_kind = qual_type_kind(mod_type) if mod_type else None
        functional = type_kind is None
        if functional:
            name = f"{mod_path}.{node.name}" if mod_path else node.name
            mtype = op
        else:
            name = mod_path
            kind = type_kind
            mtype = mod_type.rsplit(".", 1)[-1]
        if name in used_names:  # a module called more than once
            used_names[name] += 1
            prev = next(s for s in sites if s.name == name)
            prev.calls = used_names[name]
            prev.reused = True
            continue
        used_names[name] = 1
        extra: dict = {}
        s = Site(name=name, kind=kind, module_type=mtype, functional=functional,
                 region=mod_path.rsplit(".", 1)[0] if "." in mod_path else "")
        s.onnx_ops = list(NORMS[kind].onnx_ops)
        stats, params = {}, {}
        for role in ("weight", "bias", "running_mean", "running_var"):
            key, t = tensor_of(args.get(role))
            if t is not None:
                (stats if role.startswith("running") else params)[role] = t
        shape_arg = _arg(sig, node, "normalized_shape")
        if isinstance(shape_arg, (list, tuple)):
            s.shape = {"normalized_shape": list(shape_arg)}
        groups = _arg(sig, node, "num_groups")
        if isinstance(groups, int):
            s.shape = {"num_groups": groups}
        s.affine = args.get("weight") is not None
        eps = args.get("eps")
        s.eps = to_float(eps) if isinstance(eps, (float, int)) and not isinstance(eps, bool) else None
        has_stats = sig.index("running_mean") is not None or sig.param("training") == "training"
        if not has_stats:
            s.running_stats = False
        else:
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
            if not functional and mod_path:
                nbt = state.get(f"{mod_path}.num_batches_tracked")
                if isinstance(nbt, torch.Tensor):
                    stats["num_batches_tracked"] = nbt
        if not functional and mod_path:
            for k in ("weight", "bias"):
                t = state.get(f"{mod_path}.{k}")
                if isinstance(t, torch.Tensor):
                    params.setdefault(k, t)
            if has_stats:
                for k in NORMS[op_kind].running_stat_names:
                    t = state.get(f"{mod_path}.{k}")
                    if isinstance(t, torch.Tensor):
                        stats.setdefault(k, t)
            w = params.get("weight")
            if isinstance(w, torch.Tensor) and NORMS[kind].layout == "conv":
                s.shape.setdefault("num_features", int(w.shape[0]))
        # producer / consumers
        inp = node.args[0] if node.args else None
        if hasattr(inp, "op"):
            pop = _op_name(inp.target) if inp.op == "call_function" else inp.op
            pstack = list((inp.meta.get("nn_module_stack") or {}).values())
            pname = pstack[-1][0] if pstack else inp.name
            kindp = G.producer_op(pop, "input" if inp.op == "placeholder" else "other")
            if pop == "convolution" and len(inp.args) > 6:
                kindp = "conv_transpose" if inp.args[6] else "conv"
            s.producer = {"name": pname, "op": kindp, "type": pop,
                          "other_users": len(inp.users) > 1}
            s.producer_shared = len(inp.users) > 1
            extra["producer_desc"] = _node_desc(inp)
            extra["producer_users"] = [_node_desc(u) for u in inp.users]
        s.consumers = []
        for u in node.users:
            targets = [u] if _op_name(u.target) != "getitem" else list(u.users)
            for v in targets:
                vstack = list((v.meta.get("nn_module_stack") or {}).values())
                s.consumers.append({"name": (vstack[-1][0] if vstack else "") or v.name,
                                    "op": _op_name(v.target) if v.op == "call_function" else v.op,
                                    "type": None})
                extra.setdefault("consumers", []).append(_node_desc(v))
                extra.setdefault("consumer_ops", []).append(_node_op(v))
        check_tensors(s, stats, params, s.eps, kind)
        extras[name] = extra
        sites.append(s)
    sites.extend(_ep_module_sites(ep, sites, state, ph_to_key, extras))
    seen_names = {s.name for s in sites}
    sites.extend(r for r in reparam_sites_from_names(state) if r.name not in seen_names)
    return finish_compiled(rep, sites, extras)


def _ep_module_sites(ep, sites: list, state: dict, ph_to_key: dict, extras: dict) -> list:
    """Norm modules of an ExportedProgram that lower to primitive ops (custom RMSNorm,
    frozen BN, ...): found from ``nn_module_stack`` by class and state-dict structure."""
    from normswap.norms import looks_like_norm_name  # noqa: PLC0415

    sig = ep.graph_signature
    params = set((getattr(sig, "inputs_to_parameters", {}) or {}).values())
    known = {s.name for s in sites}
    modules: dict[str, str] = {}
    nodes_of: dict[str, list] = {}
    last_node: dict[str, Any] = {}
    for node in ep.graph.nodes:
        for path, typ in (node.meta.get("nn_module_stack") or {}).values():
            modules.setdefault(path, typ)
            nodes_of.setdefault(path, []).append(node)
            last_node[path] = node
    out = []
    for path, typ in modules.items():
        if not path or path in known or any(path.startswith(k + ".") for k in known if k):
            continue
        if any(p.startswith(path + ".") for p in modules):
            continue  # not a leaf
        cls_name = typ.rsplit(".", 1)[-1]
        kind = qual_type_kind(typ)
        own = {k[len(path) + 1:]: k for k in list(state) if k.startswith(path + ".")
               and "." not in k[len(path) + 1:]}
        if kind is None:
            if not looks_like_norm_name(cls_name) and "frozen" not in cls_name.lower():
                continue
            own_params = [k for k in own.values() if k in params]
            if not own_params and all(n in own for n in ("weight", "bias", "running_mean", "running_var")):
                kind = "frozen_bn"
            elif "running_var" in own or "running_mean" in own:
                kind = "unsupported_subclass"
            elif "weight" in own:
                kind = "custom"
            else:
                continue
        s = Site(name=path, kind=kind, module_type=cls_name,
                 region=path.rsplit(".", 1)[0] if "." in path else "")
        s.onnx_ops = list(NORMS[kind].onnx_ops)
        s.notes.append("found from nn_module_stack (lowered to primitive ops)")
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
            pname = astack[-1] if astack else a.name
            s.producer = {"name": pname, "op": G.producer_op(pop, "input" if a.op == "placeholder" else "other"),
                          "type": pop, "other_users": False}
            outside = [u for u in a.users if path not in _stack_paths(u)]
            inside = len(a.users) - len(outside)
            s.producer["other_users"] = bool(outside)
            s.producer_shared = bool(outside)
            extras[path] = {"producer_desc": _node_desc(a),
                            "producer_users": [_node_desc(u) for u in outside] + [f"'{path}' ({cls_name})"] * bool(inside)}
            break
        last = last_node.get(path)
        if last is not None:
            outs = [u for u in last.users if path not in _stack_paths(u)]
            extras.setdefault(path, {}).update(consumers=[_node_desc(u) for u in outs],
                                               consumer_ops=[_node_op(u) for u in outs])
        check_tensors(s, stats, prm, None, kind)
        out.append(s)
    return out
