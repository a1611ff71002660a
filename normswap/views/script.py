"""The TorchScript view: a ``ScriptModule`` (scripted or traced) read from its own graphs.

Norm modules are found by ``original_name`` (exact registry class names) or by structure (frozen
BN, custom norms); their producer and consumers from the parent's ``prim::CallMethod`` nodes
(the one producer table, :data:`normswap.graph.PRODUCER_OPS`); functional norm calls by node
kind; spectral / weight norms from parameter names.  Nothing rewrites TorchScript, so a decision
here means "folds in the eager model": what the graph cannot prove (input ranks, the layer
after the norm, a functional call's producer) is refused, never assumed.
"""

from __future__ import annotations

import re

import torch

from normswap.graph import family_of_report, producer_op
from normswap.norm_ops import op_signature
from normswap.norms import NORMS, looks_like_norm_name
from normswap.reasons import Reason, reason

from .base import GraphView, Layer, Match, NormSite

__all__ = ["ScriptView", "COMPILED_NOTE", "describe", "reparam_sites_from_names", "script_kind_by_structure",
           "norm_call_facts"]

_MISSING = object()

#: the note every TorchScript verdict carries: the fold itself runs on the eager model
COMPILED_NOTE = "compiled graph: fold the eager model"


def describe(name: str | None, type_name: str | None) -> str:
    """A node described as the eager fold rules describe FX nodes."""
    if name == "output":
        return "the graph output"
    if name is None:
        return "an input of the model"
    return f"'{name}' ({type_name})" if type_name else f"'{name}' (call_function)"


def _has(m, attr: str) -> bool:
    try:
        getattr(m, attr)
        return True
    except Exception:
        return False


def script_kind_by_structure(m, oname: str) -> str | None:
    """Kinds a TorchScript module can only be recognised by (its class is gone): frozen BN,
    BatchNorm-like classes of unknown type, custom norms by class name."""
    if not looks_like_norm_name(oname) and "frozen" not in oname.lower():
        return None
    params = dict(m.named_parameters(recurse=False))
    bufs = dict(m.named_buffers(recurse=False))
    if not params and all(k in bufs for k in ("weight", "bias", "running_mean", "running_var")):
        return "frozen_bn"
    if "running_var" in bufs or "running_mean" in bufs:
        return "unsupported_subclass"
    has_children = next(iter(m.children()), None) is not None
    has_eps = any(_has(m, a) for a in ("eps", "variance_epsilon", "epsilon"))
    if not has_children and (params.get("weight") is not None or has_eps):
        return "custom"
    return None


def reparam_sites_from_names(names) -> list[tuple[str, str, str]]:
    """(site name, kind, api) of spectral / weight norms found from parameter / buffer names."""
    names = list(names)
    have = set(names)
    found = []
    for n in names:
        if n.endswith("_orig") and f"{n[:-5]}_u" in have:  # legacy hook: weight_orig / weight_u / weight_v
            found.append((n[:-5], "spectral", "hook"))
        elif n.endswith("_g") and f"{n[:-2]}_v" in have:  # legacy hook: weight_g / weight_v
            found.append((n[:-2], "weight_norm", "hook"))
        elif ".parametrizations." in n and n.endswith(".original"):
            base = n[: -len(".original")]
            if any(h.startswith(base + ".") and h.endswith("._u") for h in have):
                owner, _, p = base.rpartition(".parametrizations.")
                found.append((f"{owner}.{p}", "spectral", "parametrization"))
        elif ".parametrizations." in n and n.endswith(".original0") and n[:-1] + "1" in have:
            owner, _, p = n[: -len(".original0")].rpartition(".parametrizations.")
            found.append((f"{owner}.{p}", "weight_norm", "parametrization"))
    return found


def norm_call_facts(m) -> dict:
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
            return describe(q, t), producer_op(t)
    return describe(k.split("::")[-1], None), "other"


def _callinfo(path: str, m, mods: dict, out: dict) -> None:
    """Producer / consumer facts of each child call in ``m``'s own graph."""
    try:
        g = m.graph
    except Exception:
        return
    attr_of = {node.output().unique(): node.s("name") for node in g.nodes() if node.kind() == "prim::GetAttr"}
    for node in g.nodes():
        if node.kind() != "prim::CallMethod":
            continue
        ins = list(node.inputs())
        child = attr_of.get(ins[0].unique())
        if child is None:
            continue
        q = f"{path}.{child}" if path else child
        rec = out.setdefault(q, {"calls": 0, "producer": None})
        rec["calls"] += 1
        if rec["calls"] == 1:
            outs = [_use_desc(u.user, attr_of, path, mods) for u in node.output().uses()]
            rec["consumers"] = [d for d, _ in outs]
            rec["consumer_ops"] = [o for _, o in outs]
            if len(ins) > 1:
                rec["producer_users"] = [_use_desc(u.user, attr_of, path, mods)[0] for u in ins[1].uses()]
        if len(ins) > 1 and rec["producer"] is None:
            src = ins[1].node()
            pname = attr_of.get(list(src.inputs())[0].unique()) if src.kind() == "prim::CallMethod" else None
            if pname is not None:
                pq = f"{path}.{pname}" if path else pname
                ptype = getattr(mods.get(pq), "original_name", None)
                rec["producer"] = {"name": pq, "op": producer_op(ptype), "type": ptype,
                                   "other_users": len(ins[1].uses()) > 1}
            else:
                rec["producer"] = {"name": None, "op": "input" if src.kind() == "prim::Param" else "other",
                                   "type": src.kind(), "other_users": len(ins[1].uses()) > 1}


def _graph_groups(m) -> int:
    """The ``groups`` of a (traced) conv module read from its own graph's convolution call."""
    try:
        for node in m.graph.nodes():
            if node.kind() in ("aten::_convolution", "aten::convolution", "aten::conv_transpose2d",
                               "aten::conv_transpose1d", "aten::conv_transpose3d", "aten::conv2d", "aten::conv1d",
                               "aten::conv3d"):
                ins = list(node.inputs())
                idx = {"aten::_convolution": 8, "aten::convolution": 8}.get(node.kind(), 6)
                if node.kind().startswith("aten::conv_transpose"):
                    idx = 6
                v = ins[idx].toIValue() if len(ins) > idx else None
                return int(v) if isinstance(v, int) else 1
    except Exception:  # noqa: BLE001
        pass
    return 1


class ScriptView(GraphView):
    FRONT_END = "torchscript"
    CAN_APPLY = False

    def __init__(self, sm):
        self.sm = sm
        self.mods = dict(sm.named_modules())
        self.callinfo: dict[str, dict] = {}
        for path, m in self.mods.items():
            _callinfo(path, m, self.mods, self.callinfo)
        self.removed: dict[str, dict] = {}  # folded norm name -> its producer record
        self._sites: list[NormSite] | None = None

    # ------------------------------------------------------------------ sites
    def sites(self) -> list[NormSite]:
        if self._sites is None:
            self._sites = self._module_sites()
            self._sites += self._functional_sites({s.name for s in self._sites})
            known = {s.name for s in self._sites}
            names = [n for n, _ in self.sm.named_parameters()] + [n for n, _ in self.sm.named_buffers()]
            for name, kind, api in reparam_sites_from_names(names):
                if name not in known:
                    self._sites.append(NormSite(name, kind, None, [], facts={"reparam": api}))
        return self._sites

    def _module_sites(self) -> list[NormSite]:
        kinds = {t.__name__: k for k, nk in NORMS.items() for t in nk.types}
        out, paths = [], []
        for path, m in self.mods.items():
            oname = getattr(m, "original_name", type(m).__name__)
            kind = kinds.get(oname) or (script_kind_by_structure(m, oname) if path else None)
            if kind is None or any(path.startswith(p + ".") for p in paths):
                continue
            paths.append(path)
            out.append(NormSite(path, kind, m, [], type_name=oname, facts={"rec": self.callinfo.get(path)}))
        return out

    def _functional_sites(self, norm_paths: set) -> list[NormSite]:
        out = []
        for path, m in self.mods.items():
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
                    try:
                        fname = list(node.inputs())[0].node().s("name")
                    except Exception:
                        fname = ""
                    sig = op_signature(f"F.{fname}")
                if sig is None:
                    continue
                i = count.get(fname, 0)
                count[fname] = i + 1
                local = fname if i == 0 else f"{fname}_{i}"
                out.append(NormSite(f"{path}.{local}" if path else local, sig.kind, None, [], functional=node,
                                    type_name=fname, facts={"region": path}))
        return out

    # ------------------------------------------------------------------ the norm
    def _running_stats(self, site: NormSite):
        m = site.module
        try:
            return bool(m.track_running_stats)
        except Exception:
            pass
        call = norm_call_facts(m)
        if "batch_stats" in call:
            return not call["batch_stats"]
        k = NORMS[site.kind]
        return k.running_stats if k.running_stats is not None else bool(k.running_stat_names)

    def kind_problem(self, site: NormSite) -> Reason | None:
        api = site.facts.get("reparam")
        if api is not None:
            what = ("bake it in the eager model (--bake-spectral-norm)" if NORMS[site.kind].mode_sensitive
                    else "not baked")
            return reason("compiled_reparam", kind=site.kind, what=what)
        return NORMS[site.kind].fold_refusal(None, type_name=site.type_name,
                                            running_stats=self._running_stats(site) if site.module else None)

    def mode_problem(self, site: NormSite) -> Reason | None:
        if self.sm.training:
            return reason("model_training", hint="pass eval=True / --eval-mode")
        if site.module is not None and site.module.training:
            return reason("norm_training", hint="pass eval=True / --eval-mode")
        return None

    def eval_affine(self, site: NormSite):
        if self._running_stats(site) is False:
            return reason("no_running_stats" if site.kind == "bn" else "in_no_running_stats")
        try:
            return NORMS[site.kind].eval_affine(site.module)
        except Exception:  # noqa: BLE001 - a traced module keeps no config attributes the registry reads
            return self._stats_affine(site)

    def _stats_affine(self, site: NormSite):
        """The affine's size, and whether its tensors are finite, from the module's tensors alone
        (the values are not needed: nothing is applied on this view)."""
        from normswap import arith

        m = site.module
        ts = {n: getattr(m, n) for n in ("weight", "bias", *NORMS[site.kind].running_stat_names) if _has(m, n)}
        ts = {n: t for n, t in ts.items() if isinstance(t, torch.Tensor)}
        if not ts:
            return reason("compiled_unproven", text="its eval affine cannot be read")
        if not arith.is_finite(*ts.values()):
            return reason("nonfinite_stats")
        c = int(ts["weight"].numel()) if "weight" in ts else int(next(iter(ts.values())).numel())
        return torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)

    def nonfinite_affine(self, site: NormSite) -> bool:
        from normswap import arith

        for p in ("weight", "bias"):
            t = getattr(site.module, p, None) if _has(site.module, p) else None
            if isinstance(t, torch.Tensor) and not arith.is_finite(t):
                return True
        return False

    def norm_affine(self, site: NormSite):
        return reason("compiled_affine_only", kind=site.kind)

    def unseen_problem(self, site: NormSite) -> Reason | None:
        if site.facts.get("rec") is None:
            return reason("compiled_unproven", text="its producer cannot be proven")
        return None

    def describe_input(self, site: NormSite) -> str:
        p = self._prod(site)
        return describe(p.get("name"), p.get("type")) if p else "unknown"

    # ------------------------------------------------------------------ neighbours
    def _prod(self, site: NormSite) -> dict | None:
        rec = site.facts.get("rec") or {}
        p = rec.get("producer")
        while p and p.get("name") in self.removed:  # a folded norm acts as the identity
            p = self.removed[p["name"]]
        return p

    def first_input_family(self, site: NormSite) -> str | None:
        p = self._prod(site)
        return family_of_report(p.get("op")) if p else None

    def producer(self, site: NormSite, families: tuple, what: str, extra_args_ok: bool = False):
        rec = site.facts.get("rec") or {}
        p = self._prod(site)
        if rec.get("calls", 1) > 1:
            return reason("called_at_places", calls=rec["calls"], note=COMPILED_NOTE)
        if not p or family_of_report(p.get("op")) not in families:
            return reason("input_not_layer", input=self.describe_input(site), what=what)
        users = rec.get("producer_users") or []
        if p.get("other_users"):
            return reason("producer_users", layer=p["name"], users=f" ({', '.join(users)})")
        prec = self.callinfo.get(p["name"]) or {}
        if prec.get("calls", 1) > 1:
            return reason("producer_call_sites", layer=p["name"], detail="")
        m = self.mods.get(p["name"])
        w = getattr(m, "weight", None) if m is not None and _has(m, "weight") else None
        fam = family_of_report(p["op"])
        dims = int(re.search(r"([123])d", p.get("type") or "1d").group(1)) if fam != "linear" else None
        if not isinstance(w, torch.Tensor):
            return reason("compiled_unproven", text=f"the weight of '{p['name']}' cannot be read")
        groups = int(getattr(m, "groups")) if _has(m, "groups") else _graph_groups(m)
        out = int(w.shape[1]) * groups if fam == "convt" else int(w.shape[0])
        return Layer(p["name"], fam, out, int(w.shape[1]) if fam != "convt" else int(w.shape[0]), dims, groups,
                     handle=m, type_name=p.get("type") or "")

    def consumers(self, site: NormSite, families: tuple, what: str):
        rec = site.facts.get("rec") or {}
        cons, ops = rec.get("consumers") or [], rec.get("consumer_ops") or []
        if not cons:
            return reason("output_unused")
        for c, op in zip(cons, ops or [None] * len(cons)):
            if op not in ("conv", "conv_transpose", "linear"):
                return reason("feeds_other", user=c, what="Conv/Linear")
        return reason("compiled_next", layer=cons[0])

    def mark_removed(self, site: NormSite, match: Match, removes_norm: bool) -> None:
        if removes_norm and site.module is not None:
            self.removed[site.name] = self._prod(site) or {}

    def functional_problem(self, site: NormSite) -> Reason:
        if self.sm.training:
            return reason("model_training_short", hint="pass eval=True / --eval-mode")
        return reason("compiled_unproven", text="functional batch_norm: its producer cannot be proven")
