"""The TorchScript front-end: a ``ScriptModule`` (scripted or traced) audited from its own
graphs through the TorchScript view (:mod:`normswap.views.script`): its sites, their producers
and consumers, and the planner's verdicts on that view."""

from __future__ import annotations

import torch

from normswap.norms import NORMS
from normswap.views.script import COMPILED_NOTE, ScriptView, norm_call_facts

from .compiled import finish_compiled, reparam_site
from .report import AuditReport, Site, check_tensors

__all__ = ["audit_script"]


def _eps(m, call: dict):
    for a in ("eps", "variance_epsilon", "epsilon"):
        try:
            return float(getattr(m, a))
        except Exception:
            pass
    return call.get("eps")


def _module_site(view: ScriptView, vs, sm) -> Site:
    m, kind, path = vs.module, vs.kind, vs.name
    desc = NORMS[kind]
    s = Site(name=path, kind=kind, module_type=vs.type_name)
    s.region = path.rsplit(".", 1)[0] if "." in path else ""
    s.mode = "train" if m.training else "eval"
    s.onnx_ops = list(desc.onnx_ops)
    for a in ("num_features", "num_groups", "num_channels", "normalized_shape"):
        try:
            v = getattr(m, a)
            s.shape[a] = list(v) if isinstance(v, (tuple, list)) else v
        except Exception:
            pass
    call = norm_call_facts(m)  # traced modules keep no eps/track_running_stats attributes
    s.eps = _eps(m, call)
    for a in ("affine", "elementwise_affine"):
        try:
            s.affine = bool(getattr(m, a))
            break
        except Exception:
            pass
    s.running_stats = view._running_stats(vs)
    rec = vs.facts.get("rec")
    if rec is not None:
        s.calls = rec["calls"]
        s.reused = rec["calls"] > 1
        s.producer = rec["producer"]
        s.producer_shared = bool(s.producer and s.producer.get("other_users"))
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
    return s


def _functional_site(vs) -> Site:
    s = Site(name=vs.name, kind=vs.kind, module_type=vs.type_name, functional=True, region=vs.facts["region"])
    s.onnx_ops = list(NORMS[vs.kind].onnx_ops)
    s.notes.append("functional call (TorchScript)")
    return s


def audit_script(sm: torch.jit.ScriptModule) -> AuditReport:
    rep = AuditReport(model=getattr(sm, "original_name", type(sm).__name__), source="torchscript")
    rep.notes.append("TorchScript: audited from its own graph (best effort)")
    view = ScriptView(sm)
    sites: list[Site] = []
    for vs in view.sites():
        if vs.facts.get("reparam"):
            sites.append(reparam_site(vs.name, vs.kind, vs.facts["reparam"]))
        elif vs.functional is not None:
            sites.append(_functional_site(vs))
        else:
            sites.append(_module_site(view, vs, sm))
    return finish_compiled(rep, sites, view, COMPILED_NOTE)
