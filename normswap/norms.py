"""The norm registry: one place that describes every normalization kind normswap knows.

``NORMS`` is a plain dict keyed by kind name (like timm's ``create_norm.py``).  Each
:class:`NormKind` says which *exact* module types it matches, what its statistics are
taken over, whether it has running statistics and an affine, whether its eval-time
closed form is a per-channel affine (foldable), and which ONNX ops it exports to.

Matching is by **exact type**: a subclass of a known norm (timm's ``BatchNormAct2d``, a
``BatchNorm2d`` subclass that also applies an activation) is ``unsupported_subclass``,
never treated as its base.  Frozen BatchNorm (torchvision / detectron2 style, all
buffers) is recognised by structure, and norms of other libraries (HF ``LlamaRMSNorm``,
``T5LayerNorm``...) by class-name pattern and parameter shapes (``custom``).

Spectral norm and weight norm are not modules of their own: they sit on a producer's
weight, see :func:`weight_reparam` / :func:`weight_reparams` / :func:`iter_weight_reparams`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

__all__ = [
    "NormKind",
    "NORMS",
    "register",
    "register_type",
    "kind_of",
    "bad_statistics",
    "KIND_NAMES",
    "classify",
    "classify_type",
    "looks_like_norm_name",
    "known_base",
    "is_composite",
    "iter_norms",
    "weight_reparam",
    "weight_reparams",
    "iter_weight_reparams",
    "WeightReparam",
    "is_weight_std_conv",
    "norm_eps",
    "norm_shape",
    "FUNCTIONAL_NORMS",
    "functional_kind",
]


def _getf(module: nn.Module, *names: str):
    for n in names:
        v = getattr(module, n, None)
        if v is not None:
            return v
    return None


def _tensor_ok(t) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, nn.parameter.UninitializedTensorMixin) \
        and t.numel() > 0


@dataclass(frozen=True)
class NormKind:
    """Static facts about one kind of norm, and the per-module questions every job asks.

    Jobs never re-derive a per-kind fact: audit, fold, convert, export and check ask the
    kind (``NORMS[kind].eps(module)``, ``.eval_affine(module)``, ...).  Adding a kind is one
    :func:`register` call (the seed layers in :mod:`normswap.layers` register themselves).
    """

    name: str
    #: exact module types this kind matches (seed layers add theirs with :func:`register_type`)
    types: tuple[type, ...]
    #: "batch" (statistics over the batch), "sample" (per-sample statistics),
    #: "weight" (a reparametrisation of a producer's weight), "none" or "unknown"
    stats: str
    #: what the statistics are taken over, in words (x is (N, C, *spatial))
    axes: str
    #: True / False, or None when it depends on the module's configuration
    running_stats: bool | None
    affine: bool | None
    #: "yes": eval closed form is a per-channel affine; "running_stats": only when running
    #: statistics are used at eval; "affine_only": only the affine part can move into a
    #: neighbouring linear op; "bake": the weight can be baked to a constant; "partial": a part
    #: of it; "no"
    foldable: str
    onnx_ops: tuple[str, ...]
    description: str = ""
    #: True for norms built out of other modules (their children are not separate sites)
    composite: bool = False
    #: fold family: "bn_like" (eval = per-channel affine on dim 1, folds into the producing or
    #: consuming conv/linear), "affine_only" (only gamma/beta move into the next linear), or None
    fold_family: str | None = None
    #: why a norm of this kind is never folded (None: ask :meth:`fold_refusal`)
    no_fold_reason: str | None = None
    #: convert layout: "conv" (per channel on dim 1 of (N, C, *)), "token" (last dim), or None
    layout: str | None = None
    #: running-statistic buffer names (on the module, or on its ``bn`` child when composite)
    running_stat_names: tuple[str, ...] = ()
    #: eval-time affine: ``fn(module, eps) -> (scale, shift)`` float64 (built on fold.arith)
    eval_affine_fn: Callable | None = field(default=None, compare=False, hash=False)
    #: its training forward differs from its eval forward (statistics of the batch, power
    #: iteration, ...): True, False, or None = when :meth:`uses_running_stats` says so
    mode_sensitive: bool | None = False
    #: for another library's class (timm's BatchNormAct2d, LayerNorm2d, ...): a predicate that
    #: recognises an instance by its structure (class name, base, attributes, children); it is
    #: asked before a subclass of a known type is called ``unsupported_subclass``
    recognise: Callable | None = field(default=None, compare=False, hash=False)
    #: children a structurally recognised norm applies after normalising (e.g. ("drop", "act"))
    post_ops: tuple[str, ...] = ()
    #: the class names (and base) a structurally recognised kind is known by, for readers that
    #: have a class but no instance (TorchScript / torch.export graphs): name + base only
    class_names: tuple[str, ...] = ()
    class_base: type | None = None

    # ----------------------------------------------------------------- per-module questions

    def stat_module(self, module: nn.Module) -> nn.Module:
        """The module holding the statistics (a composite norm's inner ``bn``)."""
        if self.composite:
            inner = getattr(module, "bn", None)
            if isinstance(inner, nn.Module) and inner is not module:
                return inner
        return module

    def eps(self, module: nn.Module) -> float | None:
        """The eps the module uses (None when unknown / dtype-dependent)."""
        return norm_eps(module)

    def has_affine(self, module: nn.Module) -> bool | None:
        for a in ("affine", "elementwise_affine"):
            v = getattr(module, a, None)
            if isinstance(v, bool):
                return v
        if self.affine is not None:
            return self.affine
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            return True
        return False if self.name != "custom" else None

    def uses_running_stats(self, module: nn.Module) -> bool | None:
        """Does the module normalise with running statistics at eval?"""
        src = self.stat_module(module)
        v = getattr(src, "track_running_stats", None)
        if isinstance(v, bool):
            if v and self.running_stat_names:
                return all(getattr(src, n, None) is not None for n in self.running_stat_names[:1])
            return v
        if self.running_stats is not None:
            return self.running_stats
        return bool(self.running_stat_tensors(module)) or None

    def running_stat_tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Running statistics (mean / var / phi / num_batches_tracked) the module holds."""
        src = self.stat_module(module)
        names = self.running_stat_names or ("running_mean", "running_var", "running_phi")
        out = {}
        for n in tuple(names) + ("num_batches_tracked",):
            t = getattr(src, n, None)
            if _tensor_ok(t):
                out[n] = t
        return out

    def is_mode_sensitive(self, module: nn.Module | None = None) -> bool:
        """Does a training-mode forward differ from the eval one (so the mode matters)?"""
        if self.mode_sensitive is None:
            return bool(module is not None and self.uses_running_stats(module))
        return bool(self.mode_sensitive)

    def batch_stats_in_training(self, module: nn.Module) -> bool:
        """In training mode, does it normalise with (and update) batch statistics?  A module in
        training mode for which this is True exports wrongly (exporters emit the eval form)."""
        if self.stats == "batch":
            return True
        if self.name == "spectral":
            return True
        return bool(self.mode_sensitive is None and self.uses_running_stats(module))

    def eval_affine(self, module: nn.Module):
        """``(scale, shift)`` float64 of the eval-time per-channel affine, or a reason string."""
        if self.eval_affine_fn is None:
            return f"{self.name}: no eval-time affine"
        if self.mode_sensitive is None or self.name == "bn":
            if not self.uses_running_stats(module):
                return ("track_running_stats=False: it normalises with batch statistics even in eval"
                        if self.name == "bn" else "InstanceNorm without running statistics")
        stats = self.running_stat_tensors(module)
        for n in self.running_stat_names:
            if isinstance(getattr(self.stat_module(module), n, None), nn.parameter.UninitializedBuffer):
                return "uninitialized lazy norm"
            if n not in stats:
                return f"missing running statistic {n}"
        for n in self.running_stat_names:
            t = stats.get(n)
            if n in ("running_var", "running_phi") and t is not None and t.is_floating_point() \
                    and bool((t < 0).any()):
                return f"negative {n} (min {float(t.min()):.3g}): broken statistics"
        eps = self.eps(module)
        out = self.eval_affine_fn(module, 1e-5 if eps is None else eps)
        if isinstance(out, str):
            return out
        from normswap.fold import arith  # noqa: PLC0415 - pure tensor functions

        s, t = out
        w, b = getattr(module, "weight", None), getattr(module, "bias", None)
        tensors = [stats.get(n) for n in self.running_stat_names] + [
            x for x in (w, b) if isinstance(x, torch.Tensor)]
        if not arith.is_finite(*tensors) or not arith.is_finite(s, t):
            return "non-finite statistics (NaN/Inf in running stats or affine, or var + eps <= 0)"
        return s, t

    def fold_refusal(self, module: nn.Module | None = None, *, type_name: str | None = None,
                     base_name: str | None = None, running_stats: bool | None = None) -> str | None:
        """Why a norm of this kind is never folded whatever its neighbours are; None = it may be.

        Eager callers pass the module; compiled-graph readers (TorchScript, ``.pt2``), which have
        no eager module, pass what they know: the type name, the known base's name (for an
        unsupported subclass) and whether running statistics are used at eval.
        """
        if module is not None:
            type_name = type_name or _type_name(module)
            if base_name is None and self.name == "unsupported_subclass":
                base = known_base(module)
                base_name = base.__name__ if base is not None else None
            if running_stats is None:
                running_stats = self.uses_running_stats(module)
        tname = type_name or self.name
        if self.name == "unsupported_subclass":
            return (f"unsupported subclass {tname} of {base_name or 'a known norm'}: its forward may "
                    f"do more than normalise (exact types only)")
        if self.name == "custom":
            return f"custom norm {tname}: its forward is unknown"
        if self.no_fold_reason:
            return self.no_fold_reason.format(type=tname, kind=self.name)
        if self.fold_family == "bn_like" and self.mode_sensitive is None and running_stats is False:
            return "InstanceNorm without running statistics: per-sample statistics are not a fixed affine"
        if self.fold_family is None:
            return f"{self.name}: not a foldable norm"
        return None

    def convert_layout(self, module: nn.Module) -> str | None:
        """"conv" / "token" when convert can replace the module, else None."""
        if self.layout == "token":
            shape = getattr(module, "normalized_shape", None)
            return "token" if shape is not None and len(tuple(shape)) == 1 else None
        return self.layout


def _type_name(module: nn.Module) -> str:
    t = _real_type(module)
    return t.__name__


def _t(*names: str) -> tuple[type, ...]:
    out = []
    for n in names:
        t = getattr(nn, n, None)
        if isinstance(t, type):
            out.append(t)
    return tuple(out)


def _bn_eval(m: nn.Module, eps: float):
    from normswap.fold import arith  # noqa: PLC0415

    return arith.bn_affine(m.running_mean, m.running_var, getattr(m, "weight", None),
                           getattr(m, "bias", None), eps)


NORMS: dict[str, NormKind] = {}


def register(kind: NormKind) -> NormKind:
    """Add (or replace) a kind in the registry; returns it.  Clears the type cache."""
    global _TYPE_MAP
    NORMS[kind.name] = kind
    _TYPE_MAP = None
    return kind


def register_type(kind_name: str, cls: type) -> None:
    """Make ``cls`` (exactly, not its subclasses) a module type of kind ``kind_name``."""
    global _TYPE_MAP
    k = NORMS[kind_name]
    if cls not in k.types:
        object.__setattr__(k, "types", k.types + (cls,))
    _TYPE_MAP = None


register(NormKind(
    "bn",
    _t("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
       "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"),
    "batch", "N and all spatial axes, per channel (dim 1)", None, None, "yes",
    ("BatchNormalization",),
    "BatchNorm: running statistics at eval (unless track_running_stats=False)",
    fold_family="bn_like", layout="conv", running_stat_names=("running_mean", "running_var"),
    eval_affine_fn=_bn_eval, mode_sensitive=True,
))
register(NormKind(
    "frozen_bn", (), "none", "fixed statistics (buffers only)", True, True, "yes",
    ("Mul", "Add"),
    "frozen BatchNorm (torchvision/detectron2 FrozenBatchNorm2d): weight, bias, "
    "running_mean, running_var all buffers",
    fold_family="bn_like", layout="conv", running_stat_names=("running_mean", "running_var"),
    eval_affine_fn=_bn_eval, mode_sensitive=False,
))
register(NormKind(
    "in",
    _t("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
       "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d"),
    "sample", "spatial axes, per sample and channel", None, None, "running_stats",
    ("InstanceNormalization",),
    "InstanceNorm: per-sample statistics unless track_running_stats=True",
    fold_family="bn_like", layout="conv", running_stat_names=("running_mean", "running_var"),
    eval_affine_fn=_bn_eval, mode_sensitive=None,
))
register(NormKind(
    "ln", _t("LayerNorm"), "sample", "the last len(normalized_shape) dims, per sample",
    False, None, "affine_only", ("LayerNormalization",),
    "LayerNorm", fold_family="affine_only", layout="token",
))
register(NormKind(
    "gn", _t("GroupNorm"), "sample", "each group's channels and spatial axes, per sample",
    False, None, "affine_only",
    ("Reshape", "InstanceNormalization", "Mul", "Add"),
    "GroupNorm (GroupNormalization at opset 21)", fold_family="affine_only", layout="conv",
))
register(NormKind(
    "rms", _t("RMSNorm"), "sample", "the last len(normalized_shape) dims, per sample (no mean)",
    False, None, "affine_only",
    ("Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul"),
    "RMSNorm (RMSNormalization at opset 23)", fold_family="affine_only", layout="token",
))
register(NormKind(
    "lrn", _t("LocalResponseNorm"), "sample", "neighbouring channels, per position",
    False, False, "no", ("LRN",), "LocalResponseNorm",
    no_fold_reason="LocalResponseNorm is not an affine",
))
register(NormKind(
    "spectral", (), "weight", "the producer's weight reshaped (out, -1)", None, False, "bake",
    ("constant weight after baking",),
    "spectral norm on a producer's weight (power iteration in training only)",
    mode_sensitive=True,
))
register(NormKind(
    "weight_norm", (), "weight", "the producer's weight (norm over all dims except `dim`)",
    False, False, "bake", ("constant weight after baking",),
    "weight norm on a producer's weight",
))
register(NormKind(
    "weight_std", (), "weight",
    "the producer's weight, per output channel (mean and biased variance over in/groups x k x k)",
    False, False, "bake", ("constant weight after baking",),
    "weight standardization (timm StdConv2d, ScaledStdConv2d in BiT / NFNets; HF WeightStandardizedConv2d): "
    "the conv weight is standardised in forward; constant at eval, so it can be baked",
))
register(NormKind(
    "custom", (), "unknown", "unknown (recognised by class name and parameter shapes)",
    None, None, "no", ("primitive ops",),
    "a norm of another library recognised by class name (e.g. LlamaRMSNorm, T5LayerNorm)",
    mode_sensitive=True,
))
register(NormKind(
    "unsupported_subclass", (), "unknown", "as its base, plus whatever the subclass adds",
    None, None, "no", ("unknown",),
    "a subclass of a known norm type: its forward may differ from the base, so it is "
    "never treated as the base",
    mode_sensitive=True,
))

_TYPE_MAP: dict[type, str] | None = None


def _type_map() -> dict[type, str]:
    """Exact type -> kind, over every registered kind."""
    global _TYPE_MAP
    if _TYPE_MAP is None:
        m: dict[type, str] = {}
        for kind in NORMS.values():
            for t in kind.types:
                m[t] = kind.name
        _TYPE_MAP = m
    return _TYPE_MAP


_FROZEN_NAME = re.compile(r"(?i)frozen|batch_?norm|(^|[^a-z])bn")
_CUSTOM_NAME = re.compile(r"(?i)norm")
_NOT_NORM_NAME = re.compile(r"(?i)normali[sz]e$|^(pre|post)norm|norm(block|layerwrapper)$")


def _real_type(module: nn.Module) -> type:
    """The module's type; for torch.nn.utils.parametrize's generated classes, the original."""
    t = type(module)
    if getattr(module, "parametrizations", None) is not None and t.__name__.startswith("Parametrized"):
        for b in t.__bases__:
            if issubclass(b, nn.Module):
                return b
    return t


def _is_frozen_bn(module: nn.Module) -> bool:
    if next(module.parameters(recurse=False), None) is not None:
        return False
    if next(module.children(), None) is not None:
        return False
    bufs = dict(module.named_buffers(recurse=False))
    need = ("weight", "bias", "running_mean", "running_var")
    if not all(k in bufs and isinstance(bufs[k], torch.Tensor) for k in need):
        return False
    shapes = {tuple(bufs[k].shape) for k in need}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        return False
    return bool(_FROZEN_NAME.search(type(module).__name__))


def _is_custom_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    if not _CUSTOM_NAME.search(name) or _NOT_NORM_NAME.search(name):
        return False
    if next(module.children(), None) is not None:
        return False  # wrappers like PreNorm(fn) hold modules; a norm is a leaf
    # a weight-like parameter (or buffer) whose shape is a feature shape, or an eps attribute
    tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    weightish = [
        t for n, t in tensors
        if n in ("weight", "scale", "gamma", "g", "alpha", "bias", "beta", "offset")
        and isinstance(t, torch.Tensor) and t.dim() >= 1
    ]
    has_eps = any(hasattr(module, a) for a in ("eps", "variance_epsilon", "epsilon"))
    if not weightish and not has_eps:
        return False
    # all weight-like tensors share a shape (per-feature)
    shapes = {tuple(t.shape) for t in weightish}
    return len(shapes) <= 1


def known_base(module: nn.Module) -> type | None:
    """For a subclass of a known norm type, the known base it derives from (else None)."""
    t = _real_type(module)
    tm = _type_map()
    if t in tm:
        return None
    for base in t.__mro__[1:]:
        if base in tm:
            return base
    return None


def classify(module: nn.Module) -> str | None:
    """Kind name of a module-type norm, or None if the module is not a norm.

    Exact-type match; a subclass of a known norm type is ``"unsupported_subclass"``.
    """
    t = _real_type(module)
    tm = _type_map()
    kind = tm.get(t)
    if kind is not None:
        return kind
    for k in NORMS.values():
        if k.recognise is not None:
            try:
                if k.recognise(module):
                    return k.name
            except Exception:  # noqa: BLE001 - a recogniser never breaks classification
                pass
    for base in t.__mro__[1:]:
        if base in tm:
            return "unsupported_subclass"
    if t.__module__.startswith("torch.") and not t.__module__.startswith("torch.testing"):
        return None  # torch's own classes match exactly or not at all (e.g. _SpectralNorm)
    if _is_frozen_bn(module):
        return "frozen_bn"
    if _is_custom_norm(module):
        return "custom"
    return None


def classify_type(cls: type) -> str | None:
    """Kind of a module *class* by type alone: exact registry type, or
    ``"unsupported_subclass"`` for a subclass of one; None otherwise (structure- and
    name-based kinds need an instance, see :func:`classify`)."""
    tm = _type_map()
    if cls in tm:
        return tm[cls]
    for k in NORMS.values():
        if k.class_names and getattr(cls, "__name__", None) in k.class_names and (
                k.class_base is None or (isinstance(cls, type) and issubclass(cls, k.class_base))):
            return k.name
    if any(base in tm for base in getattr(cls, "__mro__", ())[1:]):
        return "unsupported_subclass"
    return None


def looks_like_norm_name(class_name: str) -> bool:
    """Does a class name look like a norm's (``*Norm*``, not ``Normalize``/``PreNorm``)?"""
    return bool(_CUSTOM_NAME.search(class_name)) and not _NOT_NORM_NAME.search(class_name)


def is_composite(kind: str | None) -> bool:
    return kind is not None and kind in NORMS and NORMS[kind].composite


def kind_of(name: str) -> NormKind:
    """The registered kind ``name`` (KeyError names the known ones)."""
    try:
        return NORMS[name]
    except KeyError:
        raise KeyError(f"unknown norm kind {name!r}; known: {', '.join(NORMS)}") from None


def iter_norms(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """Yield (qualified name, module, kind) for every module-type norm in ``model``.

    Submodules of a norm (e.g. the inner BatchNorm of a ConditionalBatchNorm2d or of an
    unsupported subclass) are not reported separately.  A module registered under several
    names is reported once, under its first name.
    """
    root_kind = classify(model)
    if root_kind is not None:
        yield "", model, root_kind
        return
    seen: set[int] = set()
    norm_names: set[str] = set()  # linear time: look up each ancestor name, no prefix scan
    for name, mod in model.named_modules():
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        parts = name.split(".")
        if any(".".join(parts[:i]) in norm_names for i in range(1, len(parts))):
            continue
        kind = classify(mod)
        if kind is None:
            continue
        norm_names.add(name)
        yield name, mod, kind


def bad_statistics(model) -> dict[str, str]:
    """{qualified name: problem} of modules whose running statistics are NaN/Inf or negative
    (``running_var`` / ``running_phi`` < 0, any non-finite ``running_*`` buffer)."""
    bad: dict[str, str] = {}
    for name, m in model.named_modules():
        problems = []
        for bname, b in m.named_buffers(recurse=False):
            if not bname.startswith("running_") or not isinstance(b, torch.Tensor) or not b.is_floating_point():
                continue
            if not bool(torch.isfinite(b).all()):
                problems.append(f"{bname} has NaN/Inf")
            elif bname in ("running_var", "running_phi") and bool((b < 0).any()):
                problems.append(f"{bname} has negative values (min {float(b.min()):.3g})")
        if problems:
            bad[name or "<model>"] = "; ".join(problems)
    return bad


# --------------------------------------------------------------------------- weight reparametrisations


@dataclass(frozen=True)
class WeightReparam:
    """A spectral/weight norm on a module's parameter."""

    param: str  # the reparametrised parameter's name, e.g. "weight"
    kind: str  # "spectral" | "weight_norm" | "weight_std"
    api: str  # "hook" (torch.nn.utils.spectral_norm / weight_norm), "parametrization", or "forward"
    details: dict = field(default_factory=dict, compare=False, hash=False)


#: timm's weight-standardised convs (BiT, NFNet): ``forward`` standardises ``self.weight`` per
#: output channel with ``F.batch_norm(w.reshape(1, out, -1), None, None, training=True, ...)``;
#: Hugging Face's ``WeightStandardizedConv2d`` (BiT, ViT-hybrid, DPT-hybrid) does the same after
#: its optional ``self.pad`` (``DynamicPad2d``, TF 'same' padding, or None)
_WEIGHT_STD_CONVS = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame",
                     "WeightStandardizedConv2d")


def _is_weight_std_conv(module: nn.Module) -> bool:
    if not (type(module).__name__ in _WEIGHT_STD_CONVS and isinstance(module, nn.Conv2d)
            and isinstance(getattr(module, "eps", None), float)):
        return False
    if type(module).__name__ == "WeightStandardizedConv2d":  # HF: only its `pad` child, no own parameters
        kids = dict(module.named_children())
        own = {n for n, _ in module.named_parameters(recurse=False)}
        return set(kids) <= {"pad"} and own <= {"weight", "bias"}
    return True


def is_weight_std_conv(module: nn.Module) -> bool:
    """Is ``module`` a weight-standardised conv (timm StdConv2d / ScaledStdConv2d ...)?"""
    return _is_weight_std_conv(module)


def weight_reparams(module: nn.Module) -> list[WeightReparam]:
    """All spectral / weight norm reparametrisations sitting directly on ``module``."""
    out: list[WeightReparam] = []
    try:
        from torch.nn.utils.spectral_norm import SpectralNorm as _LegacySN
    except Exception:  # pragma: no cover
        _LegacySN = ()
    try:
        from torch.nn.utils.weight_norm import WeightNorm as _LegacyWN
    except Exception:  # pragma: no cover
        _LegacyWN = ()
    for hook in list(getattr(module, "_forward_pre_hooks", {}).values()):
        if _LegacySN and isinstance(hook, _LegacySN):
            out.append(WeightReparam(hook.name, "spectral", "hook", {
                "n_power_iterations": hook.n_power_iterations, "dim": hook.dim, "eps": hook.eps}))
        elif _LegacyWN and isinstance(hook, _LegacyWN):
            out.append(WeightReparam(hook.name, "weight_norm", "hook", {"dim": hook.dim}))
    if _is_weight_std_conv(module):
        out.append(WeightReparam("weight", "weight_std", "forward", {
            "eps": getattr(module, "eps", None), "scaled": hasattr(module, "gain"),
            "class": type(module).__name__}))
    plist = getattr(module, "parametrizations", None)
    if isinstance(plist, nn.ModuleDict):
        for pname, chain in plist.items():
            for p in chain:
                cname = type(p).__name__
                if cname == "_SpectralNorm":
                    out.append(WeightReparam(pname, "spectral", "parametrization", {
                        "n_power_iterations": getattr(p, "n_power_iterations", None),
                        "dim": getattr(p, "dim", None), "eps": getattr(p, "eps", None)}))
                elif cname == "_WeightNorm":
                    out.append(WeightReparam(pname, "weight_norm", "parametrization",
                                             {"dim": getattr(p, "dim", None)}))
    return out


def weight_reparam(module: nn.Module) -> str | None:
    """'spectral' / 'weight_norm' when the module's weight is reparametrised, else None."""
    r = weight_reparams(module)
    return r[0].kind if r else None


def iter_weight_reparams(model: nn.Module) -> Iterator[tuple[str, nn.Module, WeightReparam]]:
    """Yield (site name like ``conv1.weight``, owner module, WeightReparam)."""
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        for r in weight_reparams(mod):
            yield (f"{name}.{r.param}" if name else r.param), mod, r


# --------------------------------------------------------------------------- per-module facts


def norm_eps(module: nn.Module) -> float | None:
    """The eps a norm module uses (None when unknown / dtype-dependent)."""
    for a in ("eps", "variance_epsilon", "epsilon"):
        v = getattr(module, a, None)
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return float(v.detach().abs().item()) if a == "eps" and isinstance(v, nn.Parameter) else float(v.item())
        if isinstance(v, (int, float)):
            return float(v)
    inner = getattr(module, "bn", None)
    if isinstance(inner, nn.Module) and inner is not module:
        return norm_eps(inner)
    return None


def norm_shape(module: nn.Module, kind: str | None = None) -> dict:
    """Shape facts: num_features / num_groups / normalized_shape (whatever applies)."""
    kind = kind or classify(module)
    out: dict = {}
    for a in ("num_features", "num_channels", "num_groups", "normalized_shape", "size",
              "num_classes", "num_branches", "hidden_size"):
        v = getattr(module, a, None)
        if isinstance(v, (int, tuple, list)) and not isinstance(v, bool):
            out[a] = list(v) if isinstance(v, (tuple, list)) else v
    if kind in ("custom", "frozen_bn") and "num_features" not in out:
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 1:
            out["weight_shape"] = list(w.shape)
    if kind in ("cbn", "sabn") and "num_features" not in out:
        inner = getattr(module, "bn", None)
        if isinstance(inner, nn.Module) and hasattr(inner, "num_features"):
            out["num_features"] = inner.num_features
    return out


# --------------------------------------------------------------------------- functional norms


def _functional_table() -> dict:
    import torch.nn.functional as F

    table: dict = {}
    pairs = [
        (getattr(F, "batch_norm", None), "bn"),
        (getattr(torch, "batch_norm", None), "bn"),
        (getattr(torch, "native_batch_norm", None), "bn"),
        (getattr(F, "instance_norm", None), "in"),
        (getattr(torch, "instance_norm", None), "in"),
        (getattr(F, "layer_norm", None), "ln"),
        (getattr(torch, "layer_norm", None), "ln"),
        (getattr(torch, "native_layer_norm", None), "ln"),
        (getattr(F, "group_norm", None), "gn"),
        (getattr(torch, "group_norm", None), "gn"),
        (getattr(torch, "native_group_norm", None), "gn"),
        (getattr(F, "rms_norm", None), "rms"),
        (getattr(torch, "rms_norm", None), "rms"),
        (getattr(F, "local_response_norm", None), "lrn"),
    ]
    for fn, kind in pairs:
        if fn is not None:
            table[fn] = kind
    return table


FUNCTIONAL_NORMS: dict = _functional_table()


def functional_kind(target) -> str | None:
    """Kind of a functional norm call target (F.batch_norm, torch.layer_norm, ...), else None."""
    try:
        return FUNCTIONAL_NORMS.get(target)
    except TypeError:  # unhashable target
        return None


def __getattr__(name: str):
    if name == "KIND_NAMES":  # kind names in registry order, always current
        return tuple(NORMS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# the seed layers register their kinds (frn, powernorm, bgn, cbn, sabn) on import, and so do
# the norms of other libraries recognised by structure (timm, torchvision, Hugging Face)
from normswap import layers as _layers  # noqa: E402,F401
from normswap import library_norms as _library_norms  # noqa: E402,F401
