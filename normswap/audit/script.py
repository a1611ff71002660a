"""The TorchScript front-end: a ``ScriptModule`` (scripted or traced) audited from its own
graphs -- norm modules by ``original_name`` (or structure), functional norm calls by node kind
through :mod:`normswap.norm_ops`, producers through the one producer table (:mod:`normswap.graph`)."""

from __future__ import annotations

import torch

from normswap import graph as G
from normswap.norm_ops import op_signature
from normswap.norms import NORMS

from .compiled import class_kinds, describe, finish_compiled, reparam_sites_from_names
from .report import AuditReport, Site, check_tensors

__all__ = ["audit_script"]

_MISSING = object()


def _use_desc(user, attr_of: dict, path: str, mods: dict) -> tuple[str, str]:
    """(description, producer-table kind) of a TorchScript node using a value."""
    k = user.kind()
    if k == "prim::Return":
        return "the graph output", "output"
    if k == "prim::CallMethod":
        child = attr_of.get(list(user.inputs())[0].unique())
        if child is not None:
            q = f"{path}.{child}" if path else child
            t = getattr(mods.get(q), "original_name", None)
            return describe(q, t), G.producer_op(t)
    return describe(k.split("::")[-1], None), "other"


def _script_kind_by_structure(m, oname: str) -> str | None:
    """Kinds a TorchScript module can only be recognised by (its class is gone): frozen BN,
    BatchNorm-like classes of unknown type, custom norms by class name."""
    from normswap.norms import looks_like_norm_name  # noqa: PLC0415

    if not looks_like_norm_name(oname) and "frozen" not in oname.lower():
        return None
    params = dict(m.named_parameters(recurse=False))
    bufs = dict(m.named_buffers(recurse=False))
    if not params and all(k in bufs for k in ("weight", "bias", "running_mean", "running_var")):
        return "frozen_bn"
    if "running_var" in bufs or "running_mean" in bufs:
        return "unsupported_subclass"  # BatchNorm-like class that is not an exact known type
    has_children = next(iter(m.children()), None) is not None
    w = params.get("weight")
    has_eps = any(_script_has(m, a) for a in ("eps", "variance_epsilon", "epsilon"))
    if not has_children and (w is not None or has_eps):
        return "custom"
    return None


def _script_has(m, attr: str) -> bool:
    try:
        getattr(m, attr)
        return True
    except Exception:
        return False


def _script_norm_call(m) -> dict:
    """Facts from the first norm op in a TorchScript module's own graph: ``eps`` and, for ops
    with running-statistic arguments, ``batch_stats`` (True when it runs without them)."""
    out: dict = {}
    try:
        nodes = list(m.graph.nodes())
    except Exception:
        return out
    for node in nodes:
        sig = op_signature(node.kind())
        if sig is None:
            continue
        ins = list(node.inputs())

        def const(role, ins=ins, sig=sig):
            i = sig.index(role)
            if i is None or len(ins) <= i or ins[i].node().kind() != "prim::Constant":
                return _MISSING
            return ins[i].toIValue()

        try:
            eps = const("eps")
            if eps is not _MISSING and eps is not None:
                out["eps"] = float(eps)
            if sig.index("running_mean") is not None:
                rm, tr = const("running_mean"), const("training")
                batch = rm is None or (sig.param("training") != "training" and tr is True)
                out["batch_stats"] = batch
        except Exception:
            pass
        break
    return out


def audit_script(sm: torch.jit.ScriptModule) -> AuditReport:
    rep = AuditReport(model=getattr(sm, "original_name", type(sm).__name__), source="torchscript")
    rep.notes.append("TorchScript: audited from its own graph (best effort)")
    mods = dict(sm.named_modules())
    kinds = class_kinds()
    extras: dict[str, dict] = {}
    sites: list[Site] = []
    # producer/consumer facts from each parent's graph: child name -> (producer child, users)
    callinfo: dict[str, dict] = {}
    for path, m in mods.items():
        try:
            g = m.graph
        except Exception:
            continue
        attr_of = {}
        for node in g.nodes():
            if node.kind() == "prim::GetAttr":
                attr_of[node.output().unique()] = node.s("name")
        for node in g.nodes():
            if node.kind() != "prim::CallMethod":
                continue
            ins = list(node.inputs())
            child = attr_of.get(ins[0].unique())
            if child is None:
                continue
            q = f"{path}.{child}" if path else child
            rec = callinfo.setdefault(q, {"calls": 0, "producer": None})
            rec["calls"] += 1
            if rec["calls"] == 1:
                outs = [_use_desc(u.user, attr_of, path, mods) for u in node.output().uses()]
                rec["consumers"] = [d for d, _ in outs]
                rec["consumer_ops"] = [o for _, o in outs]
                if len(ins) > 1:
                    rec["producer_users"] = [_use_desc(u.user, attr_of, path, mods)[0] for u in ins[1].uses()]
            if len(ins) > 1 and rec["producer"] is None:
                src = ins[1].node()
                pname = None
                if src.kind() == "prim::CallMethod":
                    pname = attr_of.get(list(src.inputs())[0].unique())
                if pname is not None:
                    pq = f"{path}.{pname}" if path else pname
                    ptype = getattr(mods.get(pq), "original_name", None)
                    op = G.producer_op(ptype)
                    rec["producer"] = {"name": pq, "op": op, "type": ptype,
                                       "other_users": len(ins[1].uses()) > 1}
                else:
                    rec["producer"] = {"name": None, "op": "input" if src.kind() == "prim::Param"
                                       else "other", "type": src.kind(),
                                       "other_users": len(ins[1].uses()) > 1}
    norm_paths = []
    for path, m in mods.items():
        oname = getattr(m, "original_name", type(m).__name__)
        kind = kinds.get(oname)
        if kind is None and path:
            kind = _script_kind_by_structure(m, oname)
        if kind is None:
            continue
        if any(path.startswith(p + ".") for p in norm_paths):
            continue
        norm_paths.append(path)
        s = Site(name=path, kind=kind, module_type=oname)
        s.region = path.rsplit(".", 1)[0] if "." in path else ""
        s.mode = "train" if m.training else "eval"
        s.onnx_ops = list(NORMS[kind].onnx_ops)
        for a in ("num_features", "num_groups", "num_channels", "normalized_shape"):
            try:
                v = getattr(m, a)
                s.shape[a] = list(v) if isinstance(v, (tuple, list)) else v
            except Exception:
                pass
        desc = NORMS[kind]
        s.eps = None
        for a in ("eps", "variance_epsilon", "epsilon"):
            try:
                s.eps = float(getattr(m, a))
                break
            except Exception:
                pass
        call = _script_norm_call(m)  # traced modules keep no eps/track_running_stats attributes
        if s.eps is None and call.get("eps") is not None:
            s.eps = call["eps"]
        for a in ("affine", "elementwise_affine"):
            try:
                s.affine = bool(getattr(m, a))
                break
            except Exception:
                pass
        try:
            s.running_stats = bool(m.track_running_stats)
        except Exception:
            if "batch_stats" in call:  # aten::batch_norm(..., running_mean=None, ...) in the graph
                s.running_stats = not call["batch_stats"]
            else:
                s.running_stats = desc.running_stats if desc.running_stats is not None else \
                    bool(desc.running_stat_names)
        rec = callinfo.get(path)
        if rec is not None:
            s.calls = rec["calls"]
            s.reused = rec["calls"] > 1
            s.producer = rec["producer"]
            s.producer_shared = bool(s.producer and s.producer.get("other_users"))
            extras[path] = {"consumers": rec.get("consumers"), "consumer_ops": rec.get("consumer_ops"),
                            "producer_users": rec.get("producer_users"), "model_training": sm.training}
        else:
            s.graph = False
        stats = {}
        for n in (desc.running_stat_names or ("running_mean", "running_var")) + ("num_batches_tracked",):
            try:
                t = getattr(m, n)
                if isinstance(t, torch.Tensor):
                    stats[n] = t
            except Exception:
                pass
        params = {n: p for n, p in m.named_parameters()}
        sensitive = desc.mode_sensitive if desc.mode_sensitive is not None else bool(s.running_stats)
        if m.training and sensitive and (desc.stats != "unknown" or stats):
            s.flag("train_mode", "training mode: uses batch statistics; ONNX exporters export "
                   "inference BatchNorm")
        if desc.mode_sensitive is True and desc.running_stat_names and s.running_stats is False:
            s.flag("no_running_stats", "track_running_stats=False: uses batch statistics at eval")
        check_tensors(s, stats, params, s.eps, kind)
        sites.append(s)
    # functional calls in non-norm modules' own graphs
    for path, m in mods.items():
        if path in norm_paths or any(path.startswith(p + ".") for p in norm_paths):
            continue
        try:
            g = m.graph
        except Exception:
            continue
        count: dict[str, int] = {}
        for node in g.nodes():
            sig = op_signature(node.kind())
            fname = node.kind().split("::")[-1]
            if sig is None and node.kind() == "prim::CallFunction":
                fn = list(node.inputs())[0].node()
                try:
                    fname = fn.s("name")
                except Exception:
                    fname = ""
                sig = op_signature(f"F.{fname}")
            if sig is None:
                continue
            kind = sig.kind
            i = count.get(fname, 0)
            count[fname] = i + 1
            local = fname if i == 0 else f"{fname}_{i}"
            s = Site(name=f"{path}.{local}" if path else local, kind=kind, module_type=fname,
                     functional=True, region=path)
            s.onnx_ops = list(NORMS[kind].onnx_ops)
            s.notes.append("functional call (TorchScript)")
            sites.append(s)
    seen_names = {s.name for s in sites}
    names = [n for n, _ in sm.named_parameters()] + [n for n, _ in sm.named_buffers()]
    sites.extend(r for r in reparam_sites_from_names(names) if r.name not in seen_names)
    return finish_compiled(rep, sites, extras)
