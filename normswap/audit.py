"""``normswap audit``: which normalization layers a model uses, where, in which mode,
whether each can be folded, and what risks it carries.

:func:`audit` accepts an ``nn.Module``, a TorchScript module, a ``torch.export``
``ExportedProgram`` or a ``normswap.io.LoadedModel`` and returns an :class:`AuditReport`
(one :class:`Site` per norm: module norms, functional norm calls, and spectral / weight
norm reparametrisations of a producer's weight).  Auditing never changes the model and
never fails because part of the model cannot be traced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from normswap import graph as G
from normswap.norms import (
    NORMS,
    iter_norms,
    iter_weight_reparams,
    known_base,
    norm_eps,
    norm_shape,
)
from normswap.report import Report, jsonable

__all__ = ["Site", "AuditReport", "audit", "FLAG_TEXT", "TINY_VAR_RATIO"]

#: a running variance this many times smaller than the median channel's is flagged
TINY_VAR_RATIO = 1e-3

#: risk flag codes and what they mean
FLAG_TEXT = {
    "nonfinite": "NaN/Inf in statistics or parameters",
    "tiny_var": "running variance tiny relative to the other channels (a fold amplifies it)",
    "eps_zero": "eps == 0 (division by sqrt(var) alone; NaN/Inf risk, esp. in fp16)",
    "untrained_stats": "running statistics look untrained",
    "train_mode": "in training mode (ONNX exporters silently export inference BatchNorm)",
    "no_running_stats": "track_running_stats=False: uses batch statistics at eval",
    "no_graph": "analysed without a graph (producer/consumers unknown)",
}

# kinds whose behaviour differs between train and eval mode
_MODE_SENSITIVE = {"bn", "bgn", "powernorm", "cbn", "sabn", "spectral", "unsupported_subclass", "custom"}


@dataclass
class Site:
    """One norm site."""

    name: str
    kind: str
    module_type: str
    functional: bool = False
    region: str | None = None  # region path ("" = root) in which it was found
    graph: bool = True  # analysed with a graph (producer/consumers known)
    shape: dict = field(default_factory=dict)
    affine: bool | None = None
    running_stats: bool | None = None
    eps: float | None = None
    mode: str | None = None  # "train" / "eval" / None when not applicable
    producer: dict | None = None  # {'name', 'op', 'type', 'other_users', ...}
    producer_shared: bool = False  # the producer's output has other users (or producer reused)
    calls: int = 1  # number of call sites (graph) or calls per forward (example inputs)
    reused: bool = False
    consumers: list = field(default_factory=list)
    input_shapes: list = field(default_factory=list)
    foldable: bool = False
    reason: str | None = None
    fold_into: str | None = None
    onnx_ops: list = field(default_factory=list)
    flags: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: jsonable(v) for k, v in self.__dict__.items()}

    def flag(self, code: str, text: str) -> None:
        if code not in self.flags:
            self.flags.append(code)
        self.warnings.append(text)


@dataclass
class AuditReport(Report):
    """The audit of one model."""

    model: str
    source: str = "eager"  # eager / torchscript / export
    sites: list = field(default_factory=list)
    regions: list = field(default_factory=list)  # [{'path', 'traced', 'error'}]
    notes: list = field(default_factory=list)
    fold_planner: str = "internal"
    seconds: float = 0.0

    job = "audit"

    # ---------------------------------------------------------------- derived
    @property
    def passed(self) -> bool:  # an audit always passes
        return True

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def by_name(self) -> dict:
        return {s.name: s for s in self.sites}

    @property
    def untraced(self) -> list[str]:
        """Paths of the parts analysed without a graph."""
        return [r["path"] for r in self.regions if not r["traced"]]

    def summary(self) -> dict:
        kinds: dict[str, int] = {}
        for s in self.sites:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        flags: dict[str, int] = {}
        for s in self.sites:
            for f in s.flags:
                flags[f] = flags.get(f, 0) + 1
        return {
            "sites": len(self.sites),
            "kinds": kinds,
            "foldable": sum(1 for s in self.sites if s.foldable),
            "warnings": sum(len(s.warnings) for s in self.sites),
            "flags": flags,
            "functional": sum(1 for s in self.sites if s.functional),
            "untraced": self.untraced,
        }

    def to_dict(self) -> dict:
        return jsonable({
            "model": self.model,
            "source": self.source,
            "sites": [s.to_dict() for s in self.sites],
            "regions": self.regions,
            "notes": self.notes,
            "fold_planner": self.fold_planner,
            "seconds": round(self.seconds, 4),
            "summary": self.summary(),
        })

    def summary_text(self) -> str:
        s = self.summary()
        kinds = ", ".join(f"{k} {v}" for k, v in s["kinds"].items())
        n = s["sites"]
        text = f"{n} norm site{'s' if n != 1 else ''}"
        if kinds:
            text += f" ({kinds})"
        text += f", {s['foldable']} foldable, {s['warnings']} warning{'s' if s['warnings'] != 1 else ''}"
        if s["untraced"]:
            text += f", {len(s['untraced'])} part{'s' if len(s['untraced']) != 1 else ''} without graph"
        return text


# --------------------------------------------------------------------------- helpers


def _f(x) -> float | None:
    try:
        return float(x)
    except Exception:
        return None


def _tensor_ok(t) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, nn.parameter.UninitializedTensorMixin) \
        and t.numel() > 0


def _stat_tensors(module: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """running statistics (mean / var / phi / num_batches_tracked) of a norm module."""
    src = module
    if kind in ("cbn", "sabn") and isinstance(getattr(module, "bn", None), nn.Module):
        src = module.bn
    out = {}
    for n in ("running_mean", "running_var", "running_phi", "num_batches_tracked"):
        t = getattr(src, n, None)
        if _tensor_ok(t):
            out[n] = t
    return out


def _check_tensors(site: Site, stats: dict, params: dict, eps: float | None, kind: str) -> None:
    """Add NaN/Inf, tiny-variance, eps==0 and untrained-statistics flags."""
    bad = []
    for n, t in list(stats.items()) + list(params.items()):
        if not _tensor_ok(t) or not (t.is_floating_point() or t.is_complex()):
            continue
        t = t.detach()
        nn_ = int(torch.isnan(t).sum())
        ni = int(torch.isinf(t).sum())
        if nn_ or ni:
            parts = []
            if nn_:
                parts.append(f"{nn_} NaN")
            if ni:
                parts.append(f"{ni} Inf")
            bad.append(f"{n} has {' and '.join(parts)} of {t.numel()}")
    if bad:
        site.flag("nonfinite", "; ".join(bad))
    if eps is not None and eps == 0.0:
        site.flag("eps_zero", "eps == 0: the normalisation divides by sqrt(var) alone")
    var = stats.get("running_var", stats.get("running_phi"))
    if _tensor_ok(var) and var.is_floating_point() and var.numel() > 1:
        v = var.detach().double().flatten()
        finite = torch.isfinite(v)
        if int(finite.sum()) > 1:
            vf = v.clone()
            vf[~finite] = float("inf")
            imin = int(vf.argmin())
            vmin = float(vf[imin])
            med = float(v[finite].median())
            e = eps or 0.0
            if med > 0 and vmin < TINY_VAR_RATIO * med:
                scale = math.inf if vmin + e <= 0 else 1.0 / math.sqrt(vmin + e)
                factor = math.inf if vmin + e <= 0 else math.sqrt((med + e) / (vmin + e))
                name = "running_var" if "running_var" in stats else "running_phi"
                site.flag(
                    "tiny_var",
                    f"{name}[{imin}] = {vmin:.3g} vs median {med:.3g}: a fold scales that "
                    f"channel by 1/sqrt(var+eps) = {scale:.4g}, {factor:.4g}x the median channel"
                    + (" (eps unknown, taken as 0)" if eps is None else ""),
                )
    mean = stats.get("running_mean")
    nbt = stats.get("num_batches_tracked")
    untrained = []
    if _tensor_ok(mean) and _tensor_ok(var) and "running_var" in stats:
        if bool((mean == 0).all()) and bool((var == 1).all()):
            untrained.append("running_mean all 0 and running_var all 1")
    elif kind == "powernorm" and _tensor_ok(var) and bool((var == 1).all()):
        untrained.append("running_phi all 1")
    if _tensor_ok(nbt) and nbt.numel() == 1 and int(nbt) == 0:
        untrained.append("num_batches_tracked == 0")
    if untrained:
        site.flag("untrained_stats", "untrained statistics: " + ", ".join(untrained))


def _module_type_name(module: nn.Module, kind: str) -> str:
    t = type(module)
    name = t.__name__
    if name.startswith("Parametrized") and getattr(module, "parametrizations", None) is not None:
        name = t.__bases__[0].__name__
    if kind == "unsupported_subclass":
        base = known_base(module)
        if base is not None:
            name = f"{name}({base.__name__})"
    return name


def _module_affine(module: nn.Module, kind: str) -> bool | None:
    for a in ("affine", "elementwise_affine"):
        v = getattr(module, a, None)
        if isinstance(v, bool):
            return v
    if kind in ("cbn", "sabn", "frozen_bn", "frn"):
        return True
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor):
        return True
    return False if kind != "custom" else None


def _module_running(module: nn.Module, kind: str) -> bool | None:
    v = getattr(module, "track_running_stats", None)
    if isinstance(v, bool):
        return v
    if kind in ("cbn", "sabn"):
        inner = getattr(module, "bn", None)
        v = getattr(inner, "track_running_stats", None)
        if isinstance(v, bool):
            return v
        return True
    if kind in ("frozen_bn", "powernorm", "bgn"):
        return True
    if kind in ("ln", "gn", "rms", "lrn", "frn"):
        return False
    return bool(_stat_tensors(module, kind)) or None


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


def _model_name(model: Any, original: Any) -> str:
    path = getattr(original, "path", None)
    if path is not None:
        return str(path)
    return type(model).__name__


# --------------------------------------------------------------------------- fold decisions


@dataclass
class _Decision:
    norm: str
    kind: str
    into: str | None
    pattern: str | None
    reason: str | None


def _fold_decisions(model: nn.Module, regions: list, sites: list[Site],
                    example_inputs=None) -> tuple[dict, str]:
    """name -> decision (with .reason None when foldable), and which planner made them.

    Uses ``normswap.fold.plan`` when the fold package provides it; falls back to the
    internal minimal decision for every site ``plan`` does not cover.
    """
    planned: dict = {}
    planner = "internal"
    try:
        from normswap.fold import plan as _plan  # noqa: PLC0415
    except Exception:  # fold not there yet
        _plan = None
    if _plan is not None:
        saved = _snapshot_buffers(model)
        try:
            try:
                decisions = _plan(model, regions, example_inputs=example_inputs)
            except TypeError:
                decisions = _plan(model, regions)
            for d in decisions:
                planned[d.norm] = d
            planner = "normswap.fold.plan"
        except Exception as e:  # noqa: BLE001 - never fail the audit because of the planner
            planned = {}
            planner = f"internal (fold.plan failed: {type(e).__name__}: {e})"
        finally:  # the planner may run the model: keep a train-mode model's buffers unchanged
            _restore_buffers(model, saved)
    out = {}
    for s in sites:
        out[s.name] = planned.get(s.name) or _internal_decision(model, s)
    return out, planner


def _internal_decision(model: nn.Module, s: Site) -> _Decision:
    """Minimal fold decision: BN (or frozen BN) after a conv/linear with a single user, at
    eval, with running statistics; spectral / weight norm can be baked."""

    def no(reason: str) -> _Decision:
        return _Decision(s.name, s.kind, None, None, reason)

    if "nonfinite" in s.flags:
        return no("NaN/Inf in statistics or parameters")
    if s.kind in ("spectral", "weight_norm"):
        if s.kind == "spectral" and s.mode == "train":
            return no("training mode: power iteration changes the weight at every forward")
        owner = s.name.rsplit(".", 1)[0] if "." in s.name else ""
        return _Decision(s.name, s.kind, owner, "bake", None)
    if s.kind not in ("bn", "frozen_bn"):
        desc = NORMS.get(s.kind)
        if s.kind == "unsupported_subclass":
            return no(f"{s.module_type} is a subclass of a known norm; its forward may differ")
        if s.kind == "custom":
            return no(f"{s.module_type} is an unrecognised norm class (custom)")
        if desc is not None and desc.foldable == "affine_only":
            return no(f"{s.kind}: per-sample statistics; only the affine part could move "
                      "into a neighbouring linear op")
        if s.kind == "in" and not s.running_stats:
            return no("in: per-sample statistics (track_running_stats=False)")
        if s.kind in ("cbn", "sabn"):
            return no(f"{s.kind}: conditional/per-branch affine depends on an extra input")
        if s.kind in ("frn", "lrn"):
            return no(f"{s.kind}: per-sample statistics")
        if s.kind in ("powernorm", "bgn", "in"):
            return no(f"{s.kind}: no fold pattern in the internal planner")
        return no(f"{s.kind}: not foldable")
    if s.functional:
        return no("functional call (no module to fold into)")
    if s.mode == "train":
        return no("training mode: uses batch statistics")
    if s.running_stats is False:
        return no("track_running_stats=False: uses batch statistics at eval")
    if not s.graph or s.producer is None:
        return no("no graph: producer unknown")
    if s.calls > 1:
        return no(f"module called at {s.calls} places")
    p = s.producer
    if p.get("op") not in ("conv", "conv_transpose", "linear"):
        return no(f"producer is {p.get('type') or p.get('op')} ({p.get('name')}), not a conv/linear")
    if p.get("other_users"):
        return no(f"producer {p.get('name')} output has other users")
    if p.get("producer_calls", 1) > 1:
        return no(f"producer {p.get('name')} is called at {p['producer_calls']} places")
    if p.get("op") == "linear" and s.module_type in ("BatchNorm1d", "LazyBatchNorm1d"):
        ranks = {len(sh) for sh in s.input_shapes}
        if not ranks:
            return no("BatchNorm1d after Linear: input rank unknown (give example inputs)")
        if ranks != {2}:
            return no("BatchNorm1d on a 3-D (N, C, L) input normalises dim 1, "
                      "not the Linear's output features (last dim)")
    return _Decision(s.name, s.kind, p.get("name"), f"{p.get('op')}+{s.kind}", None)


# --------------------------------------------------------------------------- eager models


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


def _audit_eager(model: nn.Module, example_inputs) -> AuditReport:
    rep = AuditReport(model=type(model).__name__, source="eager")
    regions = G.trace_regions(model)
    rep.regions = [{"path": r.path, "traced": r.gm is not None, "error": r.error,
                    "untraceable_leaves": list(r.untraceable_leaves)} for r in regions]
    for r in regions:
        if r.gm is None:
            rep.notes.append(f"{r.path or '<root>'} analysed without a graph: {r.error}")

    # graph facts for module norms: name -> list of NodeRef
    nodes: dict[str, list] = {}
    for name, ref, _kind in G.norm_nodes(regions):
        nodes.setdefault(name, []).append(ref)

    sites: list[Site] = []
    for name, mod, kind in iter_norms(model):
        desc = NORMS[kind]
        s = Site(name=name, kind=kind, module_type=_module_type_name(mod, kind))
        reg = G.region_of(regions, name)
        s.region = reg.path if reg is not None else None
        s.shape = norm_shape(mod, kind)
        s.affine = _module_affine(mod, kind)
        s.running_stats = _module_running(mod, kind)
        s.eps = norm_eps(mod)
        s.mode = "train" if mod.training else "eval"
        s.onnx_ops = list(desc.onnx_ops)
        refs = nodes.get(name, [])
        if refs:
            s.graph = True
            s.calls = len(refs)
            s.reused = len(refs) > 1
            s.producer = G.producer_info(refs[0])
            s.producer_shared = bool(s.producer.get("other_users")) or s.producer.get("producer_calls", 1) > 1
            cons = []
            for ref in refs:
                cons.extend(G.consumer_info(ref))
            s.consumers = cons
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
        track = getattr(mod, "track_running_stats", None)
        if kind in ("cbn", "sabn"):
            track = getattr(getattr(mod, "bn", None), "track_running_stats", track)
        if mod.training and (kind in _MODE_SENSITIVE or (kind == "in" and track)):
            if kind != "custom" or _stat_tensors(mod, kind):
                s.flag("train_mode", "training mode: uses batch statistics; both torch ONNX "
                       "exporters silently export it as inference BatchNorm (wrong numbers)")
        if track is False and kind in ("bn", "bgn", "cbn", "sabn", "unsupported_subclass"):
            s.flag("no_running_stats", "track_running_stats=False: uses batch statistics at eval")
        _check_tensors(s, _stat_tensors(mod, kind), _params(mod), s.eps, kind)
        sites.append(s)

    # TorchScript submodules of an eager model: audited from their own graphs
    script_sites: set[str] = set()
    script_paths: list[str] = []
    for path, sub in model.named_modules():
        if not path or not isinstance(sub, torch.jit.ScriptModule):
            continue
        if any(path.startswith(p + ".") for p in script_paths):
            continue
        script_paths.append(path)
        try:
            sub_rep = _audit_script(sub)
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
            script_sites.add(ss.name)
            sites.append(ss)

    # spectral / weight norm on producers' weights
    for site_name, owner, r in iter_weight_reparams(model):
        owner_name = site_name.rsplit(".", 1)[0] if "." in site_name else ""
        s = Site(name=site_name, kind=r.kind,
                 module_type=f"{_module_type_name(owner, r.kind)} ({r.api})")
        reg = G.region_of(regions, owner_name)
        s.region = reg.path if reg is not None else None
        s.shape = {"weight_shape": list(getattr(owner, r.param).shape)} if isinstance(
            getattr(owner, r.param, None), torch.Tensor) else {}
        s.affine = False
        s.running_stats = r.kind == "spectral"
        s.eps = _f(r.details.get("eps")) if r.details.get("eps") is not None else None
        s.mode = "train" if owner.training else "eval"
        s.onnx_ops = list(NORMS[r.kind].onnx_ops)
        s.producer = {"name": owner_name, "op": G.producer_kind(owner),
                      "type": _module_type_name(owner, r.kind), "other_users": False}
        s.notes.append(f"{r.api} API; " + ", ".join(f"{k}={v}" for k, v in r.details.items()))
        refs = G.find_module_nodes(regions, owner_name)
        s.graph = bool(refs)
        s.calls = max(1, len(refs))
        s.reused = len(refs) > 1
        if refs:
            s.consumers = [c for ref in refs for c in G.consumer_info(ref)]
        if s.kind == "spectral" and owner.training:
            s.flag("train_mode", "training mode: power iteration updates u, v (and the weight) "
                   "at every forward")
        tensors = {n: t for n, t in list(owner.named_parameters()) + list(owner.named_buffers())
                   if n.startswith(r.param) or n.startswith(f"parametrizations.{r.param}")}
        _check_tensors(s, {}, tensors, None, r.kind)
        sites.append(s)

    # functional norm calls
    for site_name, ref, kind in G.functional_nodes(regions):
        s = Site(name=site_name, kind=kind, module_type=getattr(ref.node.target, "__name__",
                 str(ref.node.target)), functional=True)
        s.region = ref.region.path
        s.onnx_ops = list(NORMS[kind].onnx_ops)
        s.producer = G.producer_info(ref)
        s.producer_shared = bool(s.producer.get("other_users"))
        s.consumers = G.consumer_info(ref)
        _functional_facts(s, ref, kind)
        sites.append(s)

    # example inputs: input ranks and real call counts
    if example_inputs is not None and _has_lazy(model):
        rep.notes.append("example inputs not run: the model has uninitialised lazy modules "
                         "(a forward would materialise them)")
        example_inputs = None
    if example_inputs is not None:
        mod_sites = [s.name for s in sites if not s.functional and s.kind not in ("spectral", "weight_norm")]
        seen, err = _observe(model, mod_sites, example_inputs)
        if err:
            rep.notes.append(err)
            example_inputs = None  # inputs that do not run must not reach the fold planner either
        else:
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
                if s.module_type in ("BatchNorm1d",) and any(len(sh) == 3 for sh in uniq):
                    s.notes.append("BatchNorm1d on a 3-D input normalises dim 1 (N, C, L)")

    decisions, planner = _fold_decisions(model, regions, sites, example_inputs)
    rep.fold_planner = planner
    for s in sites:
        d = decisions.get(s.name)
        if s.name in script_sites:
            d = _Decision(s.name, s.kind, None, None, "inside a TorchScript submodule (no eager module to rewrite)")
        if d is not None:
            s.reason = d.reason
            s.foldable = d.reason is None
            s.fold_into = d.into
    rep.sites = sites
    return rep


def _const_arg(node, index: int, key: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def _functional_facts(s: Site, ref, kind: str) -> None:
    """eps / mode / flags of a functional norm call from its FX node."""
    import torch.fx as fx

    node = ref.node
    gm = ref.region.gm
    s.notes.append("functional call")

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

    stats: dict = {}
    params: dict = {}
    if kind == "bn":
        # F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        rm = attr_tensor(_const_arg(node, 1, "running_mean"))
        rv = attr_tensor(_const_arg(node, 2, "running_var"))
        training = _const_arg(node, 5, "training", False)
        eps = _const_arg(node, 7, "eps", 1e-5)
        if rm is not None:
            stats["running_mean"] = rm
        if rv is not None:
            stats["running_var"] = rv
        for i, k in ((3, "weight"), (4, "bias")):
            t = attr_tensor(_const_arg(node, i, k))
            if t is not None:
                params[k] = t
        s.affine = _const_arg(node, 3, "weight") is not None
        s.running_stats = _const_arg(node, 1, "running_mean") is not None
        s.eps = _f(eps) if not isinstance(eps, fx.Node) else None
        if isinstance(training, bool):
            s.mode = "train" if training else "eval"
            if training:
                s.flag("train_mode", "F.batch_norm called with training=True: batch statistics")
        if not s.running_stats:
            s.flag("no_running_stats", "F.batch_norm without running statistics: batch statistics")
    elif kind in ("ln", "rms"):
        shape = _const_arg(node, 1, "normalized_shape")
        if isinstance(shape, (list, tuple)) and all(isinstance(v, int) for v in shape):
            s.shape = {"normalized_shape": list(shape)}
        w = _const_arg(node, 2, "weight")
        s.affine = w is not None
        eps = _const_arg(node, 4 if kind == "ln" else 3, "eps", 1e-5 if kind == "ln" else None)
        s.eps = _f(eps) if eps is not None and not isinstance(eps, fx.Node) else None
        s.running_stats = False
        t = attr_tensor(w)
        if t is not None:
            params["weight"] = t
    elif kind == "gn":
        g = _const_arg(node, 1, "num_groups")
        if isinstance(g, int):
            s.shape = {"num_groups": g}
        s.affine = _const_arg(node, 2, "weight") is not None
        eps = _const_arg(node, 4, "eps", 1e-5)
        s.eps = _f(eps) if not isinstance(eps, fx.Node) else None
        s.running_stats = False
    elif kind == "in":
        use_input = _const_arg(node, 5, "use_input_stats", True)
        s.running_stats = _const_arg(node, 1, "running_mean") is not None and use_input is False
        s.affine = _const_arg(node, 3, "weight") is not None
        eps = _const_arg(node, 7, "eps", 1e-5)
        s.eps = _f(eps) if not isinstance(eps, fx.Node) else None
    _check_tensors(s, stats, params, s.eps, kind)


# --------------------------------------------------------------------------- TorchScript


_FN_KIND = {
    "batch_norm": "bn", "layer_norm": "ln", "group_norm": "gn", "instance_norm": "in",
    "rms_norm": "rms", "local_response_norm": "lrn",
}
_ATEN_KIND = {f"aten::{k}": v for k, v in _FN_KIND.items()}
_ATEN_KIND.update({"aten::native_batch_norm": "bn", "aten::native_layer_norm": "ln",
                   "aten::native_group_norm": "gn", "aten::_batch_norm_impl_index": "bn"})

_CLASS_KIND: dict[str, str] | None = None


def _class_kinds() -> dict[str, str]:
    """class name -> kind for the registry's exact types (for TorchScript original_name)."""
    global _CLASS_KIND
    if _CLASS_KIND is None:
        from normswap.norms import _type_map  # noqa: PLC0415

        _CLASS_KIND = {t.__name__: k for t, k in _type_map().items()}
    return _CLASS_KIND


def _qual_type_kind(type_str: str) -> str | None:
    """'torch.nn.modules.batchnorm.BatchNorm2d' -> 'bn'.  Exact qualified names of registry
    types first; otherwise the class is looked up among already-imported modules (never
    imported) and classified by type (a subclass -> 'unsupported_subclass')."""
    import sys

    from normswap.norms import _type_map, classify_type  # noqa: PLC0415

    for t, k in _type_map().items():
        if f"{t.__module__}.{t.__qualname__}" == type_str:
            return k
    mod_name, _, cls_name = type_str.rpartition(".")
    mod = sys.modules.get(mod_name)
    cls = getattr(mod, cls_name, None) if mod is not None else None
    if isinstance(cls, type):
        return classify_type(cls)
    return None


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


def _reparam_sites_from_names(names) -> list[Site]:
    """Spectral / weight norm sites of a TorchScript module or torch.export program, found from
    its parameter and buffer names (their graphs recompute the weight with plain ops)."""
    names = list(names)
    have = set(names)
    found: list[Site] = []
    for n in names:
        site = None
        if n.endswith("_orig") and f"{n[:-5]}_u" in have:  # legacy hook: weight_orig / weight_u / weight_v
            site, kind, api = n[:-5], "spectral", "hook"
        elif n.endswith("_g") and f"{n[:-2]}_v" in have:  # legacy hook: weight_g / weight_v
            site, kind, api = n[:-2], "weight_norm", "hook"
        elif ".parametrizations." in n and n.endswith(".original"):
            base = n[: -len(".original")]
            if any(h.startswith(base + ".") and h.endswith("._u") for h in have):
                owner, _, p = base.rpartition(".parametrizations.")
                site, kind, api = f"{owner}.{p}", "spectral", "parametrization"
        elif ".parametrizations." in n and n.endswith(".original0") and n[:-1] + "1" in have:
            owner, _, p = n[: -len(".original0")].rpartition(".parametrizations.")
            site, kind, api = f"{owner}.{p}", "weight_norm", "parametrization"
        if site is None:
            continue
        s = Site(name=site, kind=kind, module_type=f"({api}, from parameter names)")
        s.region = site.rsplit(".", 1)[0] if "." in site else ""
        s.graph = False
        s.running_stats = kind == "spectral"
        s.onnx_ops = list(NORMS[kind].onnx_ops)
        s.notes.append(f"{kind} found from the names of the parameters; the graph recomputes the weight")
        found.append(s)
    return found


# aten op -> index of its eps argument
_SCRIPT_EPS_ARG = {"aten::batch_norm": 7, "aten::instance_norm": 7, "aten::group_norm": 4,
                   "aten::layer_norm": 4, "aten::rms_norm": 3}


def _script_norm_call(m) -> dict:
    """Facts from the first norm op in a TorchScript module's own graph: ``eps`` and, for
    batch_norm, ``batch_stats`` (True when it runs without running statistics)."""
    out: dict = {}
    try:
        nodes = list(m.graph.nodes())
    except Exception:
        return out
    for node in nodes:
        idx = _SCRIPT_EPS_ARG.get(node.kind())
        if idx is None:
            continue
        ins = list(node.inputs())
        try:
            if len(ins) > idx and ins[idx].node().kind() == "prim::Constant":
                v = ins[idx].toIValue()
                if v is not None:
                    out["eps"] = float(v)
            if node.kind() == "aten::batch_norm" and len(ins) > 4:
                rm = ins[3].node()
                out["batch_stats"] = rm.kind() == "prim::Constant" and ins[3].toIValue() is None
        except Exception:
            pass
        break
    return out


def _audit_script(sm: torch.jit.ScriptModule) -> AuditReport:
    rep = AuditReport(model=getattr(sm, "original_name", type(sm).__name__), source="torchscript")
    rep.notes.append("TorchScript: audited from its own graph (best effort)")
    mods = dict(sm.named_modules())
    kinds = _class_kinds()
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
            if len(ins) > 1 and rec["producer"] is None:
                src = ins[1].node()
                pname = None
                if src.kind() == "prim::CallMethod":
                    pname = attr_of.get(list(src.inputs())[0].unique())
                if pname is not None:
                    pq = f"{path}.{pname}" if path else pname
                    ptype = getattr(mods.get(pq), "original_name", None)
                    op = {"Conv1d": "conv", "Conv2d": "conv", "Conv3d": "conv",
                          "ConvTranspose1d": "conv_transpose", "ConvTranspose2d": "conv_transpose",
                          "ConvTranspose3d": "conv_transpose", "Linear": "linear"}.get(ptype, "other")
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
                s.running_stats = kind == "bn"
        rec = callinfo.get(path)
        if rec is not None:
            s.calls = rec["calls"]
            s.reused = rec["calls"] > 1
            s.producer = rec["producer"]
            s.producer_shared = bool(s.producer and s.producer.get("other_users"))
        else:
            s.graph = False
        stats = {}
        for n in ("running_mean", "running_var", "num_batches_tracked"):
            try:
                t = getattr(m, n)
                if isinstance(t, torch.Tensor):
                    stats[n] = t
            except Exception:
                pass
        params = {n: p for n, p in m.named_parameters()}
        if m.training and (kind == "bn" or (kind == "in" and s.running_stats)):
            s.flag("train_mode", "training mode: uses batch statistics; ONNX exporters export "
                   "inference BatchNorm")
        if kind == "bn" and s.running_stats is False:
            s.flag("no_running_stats", "track_running_stats=False: uses batch statistics at eval")
        _check_tensors(s, stats, params, s.eps, kind)
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
            kind = _ATEN_KIND.get(node.kind())
            fname = node.kind().split("::")[-1]
            if kind is None and node.kind() == "prim::CallFunction":
                fn = list(node.inputs())[0].node()
                try:
                    fname = fn.s("name")
                except Exception:
                    fname = ""
                kind = _FN_KIND.get(fname)
            if kind is None:
                continue
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
    sites.extend(r for r in _reparam_sites_from_names(names) if r.name not in seen_names)
    return _finish_compiled(rep, sites, sm)


# --------------------------------------------------------------------------- torch.export


_EP_KIND = {
    "_native_batch_norm_legit_no_training": ("bn", "eval"),
    "_native_batch_norm_legit": ("bn", None),
    "_native_batch_norm_legit_functional": ("bn", None),
    "native_batch_norm": ("bn", None),
    "batch_norm": ("bn", None),
    "cudnn_batch_norm": ("bn", None),
    "layer_norm": ("ln", None),
    "native_layer_norm": ("ln", None),
    "group_norm": ("gn", None),
    "native_group_norm": ("gn", None),
    "instance_norm": ("in", None),
    "rms_norm": ("rms", None),
    "_fused_rms_norm": ("rms", None),
}
_EP_PRODUCERS = {"conv1d": "conv", "conv2d": "conv", "conv3d": "conv", "linear": "linear",
                 "conv_transpose1d": "conv_transpose", "conv_transpose2d": "conv_transpose",
                 "conv_transpose3d": "conv_transpose", "addmm": "linear", "mm": "linear"}


def _op_name(target) -> str:
    n = getattr(target, "__name__", str(target))  # e.g. "batch_norm.default"
    return n.split(".")[0]


def _audit_export(ep) -> AuditReport:
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
    used_names: dict[str, int] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        op = _op_name(node.target)
        if op not in _EP_KIND:
            continue
        kind, mode = _EP_KIND[op]
        op_kind = kind  # what the aten op computes (the module may be a subclass)
        stack = node.meta.get("nn_module_stack") or {}
        entries = list(stack.values())
        mod_path, mod_type = (entries[-1] if entries else ("", ""))
        type_kind = _qual_type_kind(mod_type) if mod_type else None
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
        s = Site(name=name, kind=kind, module_type=mtype, functional=functional,
                 region=mod_path.rsplit(".", 1)[0] if "." in mod_path else "")
        s.onnx_ops = list(NORMS[kind].onnx_ops)
        stats, params = {}, {}
        if op_kind == "bn":
            # (input, weight, bias, running_mean, running_var, [training, momentum,] eps)
            args = list(node.args)
            for i, k in ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")):
                if len(args) > i:
                    key, t = tensor_of(args[i])
                    if t is not None:
                        (stats if k.startswith("running") else params)[k] = t
            s.affine = len(args) > 1 and args[1] is not None
            s.running_stats = len(args) > 3 and args[3] is not None
            if op == "_native_batch_norm_legit_no_training":
                s.eps = _f(args[-1]) if len(args) >= 7 else None
                s.mode = "eval"
            elif op in ("batch_norm", "native_batch_norm", "_native_batch_norm_legit",
                        "_native_batch_norm_legit_functional"):
                tr = args[5] if len(args) > 5 else None
                if op == "_native_batch_norm_legit" and len(args) == 6:
                    tr = args[3]  # no-stats overload
                if isinstance(tr, bool):
                    s.mode = "train" if tr else "eval"
                eps_arg = args[7] if op == "batch_norm" and len(args) > 7 else (args[-1] if args else None)
                s.eps = _f(eps_arg) if isinstance(eps_arg, float) else None
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
        elif op_kind in ("ln", "rms", "gn"):
            args = list(node.args)
            if op_kind == "gn" and len(args) > 1 and isinstance(args[1], int):
                s.shape = {"num_groups": args[1]}
            if op_kind in ("ln", "rms") and len(args) > 1 and isinstance(args[1], (list, tuple)):
                s.shape = {"normalized_shape": list(args[1])}
            w = args[2] if len(args) > 2 else None
            s.affine = w is not None
            key, t = tensor_of(w)
            if t is not None:
                params["weight"] = t
            eps_i = {"ln": 4, "rms": 3, "gn": 4}[op_kind]
            if len(args) > eps_i and isinstance(args[eps_i], float):
                s.eps = args[eps_i]
            s.running_stats = False
        if not functional and mod_path:
            for k in ("weight", "bias"):
                t = state.get(f"{mod_path}.{k}")
                if isinstance(t, torch.Tensor):
                    params.setdefault(k, t)
            if op_kind == "bn":
                for k in ("running_mean", "running_var"):
                    t = state.get(f"{mod_path}.{k}")
                    if isinstance(t, torch.Tensor):
                        stats.setdefault(k, t)
            w = params.get("weight")
            if isinstance(w, torch.Tensor) and kind in ("bn", "in", "gn"):
                s.shape.setdefault("num_features", int(w.shape[0]))
        # producer / consumers
        inp = node.args[0] if node.args else None
        if hasattr(inp, "op"):
            pop = _op_name(inp.target) if inp.op == "call_function" else inp.op
            pstack = list((inp.meta.get("nn_module_stack") or {}).values())
            pname = pstack[-1][0] if pstack else inp.name
            kindp = _EP_PRODUCERS.get(pop, "input" if inp.op == "placeholder" else "other")
            if pop == "convolution" and len(inp.args) > 6:
                kindp = "conv_transpose" if inp.args[6] else "conv"
            s.producer = {"name": pname, "op": kindp, "type": pop,
                          "other_users": len(inp.users) > 1}
            s.producer_shared = len(inp.users) > 1
        s.consumers = []
        for u in node.users:
            targets = [u] if _op_name(u.target) != "getitem" else list(u.users)
            for v in targets:
                vstack = list((v.meta.get("nn_module_stack") or {}).values())
                s.consumers.append({"name": (vstack[-1][0] if vstack else "") or v.name,
                                    "op": _op_name(v.target) if v.op == "call_function" else v.op,
                                    "type": None})
        _check_tensors(s, stats, params, s.eps, kind)
        sites.append(s)
    sites.extend(_ep_module_sites(ep, sites, state, ph_to_key))
    seen_names = {s.name for s in sites}
    sites.extend(r for r in _reparam_sites_from_names(state) if r.name not in seen_names)
    return _finish_compiled(rep, sites, None)


def _finish_compiled(rep, sites: list, module) -> "AuditReport":
    """Fold decisions for the sites of a compiled graph (TorchScript / torch.export)."""
    for s in sites:
        d = _internal_decision(module, s)
        s.reason, s.foldable, s.fold_into = d.reason, d.reason is None, d.into
        if s.module_type.endswith("from parameter names)"):
            s.reason, s.foldable, s.fold_into = (
                f"{s.kind} inside a compiled graph: bake it in the eager model (--bake-spectral-norm)"
                if s.kind == "spectral" else f"{s.kind} inside a compiled graph: not baked", False, None)
    rep.sites = sites
    rep.regions = [{"path": "", "traced": True, "error": None, "untraceable_leaves": []}]
    return rep


def _ep_module_sites(ep, sites: list, state: dict, ph_to_key: dict) -> list:
    """Norm modules of an ExportedProgram that lower to primitive ops (custom RMSNorm,
    frozen BN, ...): found from ``nn_module_stack`` by class and state-dict structure."""
    from normswap.norms import looks_like_norm_name  # noqa: PLC0415

    sig = ep.graph_signature
    buffers = set((getattr(sig, "inputs_to_buffers", {}) or {}).values())
    params = set((getattr(sig, "inputs_to_parameters", {}) or {}).values())
    known = {s.name for s in sites}
    modules: dict[str, str] = {}
    first_node: dict[str, Any] = {}
    for node in ep.graph.nodes:
        for path, typ in (node.meta.get("nn_module_stack") or {}).values():
            modules.setdefault(path, typ)
            first_node.setdefault(path, node)
    out = []
    for path, typ in modules.items():
        if not path or path in known or any(path.startswith(k + ".") for k in known if k):
            continue
        if any(p.startswith(path + ".") for p in modules):
            continue  # not a leaf
        cls_name = typ.rsplit(".", 1)[-1]
        kind = _qual_type_kind(typ)
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
        node = first_node.get(path)
        if node is not None:
            for a in node.all_input_nodes:
                astack = [p for p, _ in (a.meta.get("nn_module_stack") or {}).values()]
                if path in astack or (a.op == "placeholder" and a.name in ph_to_key):
                    continue
                pop = _op_name(a.target) if a.op == "call_function" else a.op
                pname = astack[-1] if astack else a.name
                s.producer = {"name": pname, "op": _EP_PRODUCERS.get(pop, "input" if a.op == "placeholder"
                                                                     else "other"),
                              "type": pop, "other_users": len(a.users) > 1}
                s.producer_shared = len(a.users) > 1
                break
        _check_tensors(s, stats, prm, None, kind)
        out.append(s)
    return out


# --------------------------------------------------------------------------- entry point


def audit(model: Any, example_inputs=None) -> AuditReport:
    """Audit the normalization layers of ``model``.

    ``model``: an ``nn.Module``, a ``torch.jit.ScriptModule``, a ``torch.export``
    ``ExportedProgram`` or a ``normswap.io.LoadedModel``.  ``example_inputs`` (a tensor or a
    tuple of forward arguments, optional) lets the audit learn input ranks and real call
    counts; the model's buffers are restored afterwards.
    """
    import time

    t0 = time.perf_counter()
    original = model
    model = _unwrap(model)
    ep_type = getattr(getattr(torch, "export", None), "ExportedProgram", None)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(model, torch.jit.ScriptModule):
        rep = _audit_script(model)
    elif ep_type is not None and isinstance(model, ep_type):
        rep = _audit_export(model)
    elif isinstance(model, nn.Module):
        rep = _audit_eager(model, example_inputs)
    else:
        from normswap.errors import NormswapError

        raise NormswapError(f"cannot audit a {type(model).__name__}: expected an nn.Module, "
                            "a TorchScript module or an ExportedProgram")
    path = getattr(original, "path", None)
    if path is not None:
        rep.model = str(path)
    fmt = getattr(original, "format", None)
    if fmt:
        rep.notes.insert(0, f"loaded as {fmt}")
    for n in getattr(original, "notes", None) or []:
        rep.notes.append(str(n))
    rep.seconds = time.perf_counter() - t0
    return rep
