"""The norm registry: one place that describes every normalization kind normswap knows.

``NORMS`` is a plain dict keyed by kind name (like timm's ``create_norm.py``); each
:class:`~normswap.registry.NormKind` says which *exact* module types it matches, what its
statistics are taken over, whether it has running statistics and an affine, whether its
eval-time closed form is a per-channel affine (its fold family), how convert lays it out, and
which ONNX ops it exports to.  Every per-kind fact of every job is one of these fields:
adding a kind is one :func:`register` call here (see ``notes/ADDING_A_NORM_KIND.md``), or in
the caller's own code for a kind of its own (``normswap.norms.register(NormKind(...))``).

Order matters only for recognisers (tried in registration order): torch's kinds, normswap's seed
layers (:mod:`normswap.layers`), then other libraries' classes recognised by structure
(:mod:`normswap.library_norms`).  The machinery (NormKind, classification) is
:mod:`normswap.registry`; weight reparametrisations (spectral / weight norm, weight
standardisation) are :mod:`normswap.reparams`.
"""

from __future__ import annotations

import torch
from torch import nn

from normswap import arith
from normswap import library_norms as L
from normswap.layers import (BatchGroupNorm2d, ConditionalBatchNorm2d, FilterResponseNorm2d, PowerNorm2d,
                             SandwichBatchNorm2d)
from normswap.registry import (NORMS, NormKind, classify, classify_type, is_composite, iter_norms,
                               kind_of, known_base, looks_like_norm_name, norm_eps, post_op_children, register,
                               register_type)
from normswap.reparams import (WeightReparam, is_weight_std_conv, iter_weight_reparams, weight_reparam,
                               weight_reparams)

__all__ = [
    "NormKind", "NORMS", "register", "register_type", "kind_of", "bad_statistics", "KIND_NAMES", "classify",
    "classify_type", "looks_like_norm_name", "known_base", "is_composite", "iter_norms", "weight_reparam",
    "weight_reparams", "iter_weight_reparams", "WeightReparam", "is_weight_std_conv", "norm_eps", "norm_shape",
    "FUNCTIONAL_NORMS", "functional_kind", "post_op_children", "bn_eval_affine",
]


def _t(*names: str) -> tuple[type, ...]:
    out = []
    for n in names:
        t = getattr(nn, n, None)
        if isinstance(t, type):
            out.append(t)
    return tuple(out)


def bn_eval_affine(m: nn.Module, eps: float):
    """The eval affine of a module holding BatchNorm buffers (running_mean / running_var, optional
    weight / bias): the ``eval_affine_fn`` of every BatchNorm-like kind."""
    return arith.bn_affine(m.running_mean, m.running_var, getattr(m, "weight", None),
                           getattr(m, "bias", None), eps)


# --------------------------------------------------------------------------- torch

register(NormKind(
    "bn",
    _t("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
       "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"),
    "batch", "N and all spatial axes, per channel (dim 1)", None, None, "yes",
    ("BatchNormalization",),
    "BatchNorm: running statistics at eval (unless track_running_stats=False)",
    fold_family="bn_like", layout="conv", running_stat_names=("running_mean", "running_var"),
    eval_affine_fn=bn_eval_affine, mode_sensitive=True, convert_default=True,
))
register(NormKind(
    "frozen_bn", (), "none", "fixed statistics (buffers only)", True, True, "yes",
    ("Mul", "Add"),
    "frozen BatchNorm (torchvision/detectron2 FrozenBatchNorm2d): weight, bias, "
    "running_mean, running_var all buffers",
    fold_family="bn_like", layout="conv", running_stat_names=("running_mean", "running_var"),
    eval_affine_fn=bn_eval_affine, mode_sensitive=False, convert_default=True,
))
register(NormKind(
    "in",
    _t("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
       "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d"),
    "sample", "spatial axes, per sample and channel", None, None, "running_stats",
    ("InstanceNormalization",),
    "InstanceNorm: per-sample statistics unless track_running_stats=True",
    fold_family="bn_like", layout="conv", running_stat_names=("running_mean", "running_var"),
    eval_affine_fn=bn_eval_affine, mode_sensitive=None,
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


# --------------------------------------------------------------------------- normswap's seed layers

def _bgn_eval(m: BatchGroupNorm2d, eps: float):
    if m.num_features % m.running_mean.numel():
        return "channels not divisible by groups"
    return arith.bgn_affine(m.running_mean, m.running_var, getattr(m, "weight", None),
                            getattr(m, "bias", None), eps, m.num_features)


register(NormKind(
    "bgn", (BatchGroupNorm2d,), "batch", "N and each group's channels and spatial axes",
    True, None, "yes", ("Reshape", "BatchNormalization", "Mul", "Add"),
    "Batch Group Norm (running statistics per group at eval)",
    fold_family="bn_like", layout="conv", running_stat_names=("running_mean", "running_var"),
    eval_affine_fn=_bgn_eval, mode_sensitive=True,
))

register(NormKind(
    "cbn", (ConditionalBatchNorm2d,), "batch",
    "N and spatial axes, per channel; affine from a condition",
    True, True, "partial", ("BatchNormalization", "Gather", "Gemm", "Mul", "Add"),
    "Conditional BatchNorm: BN statistics foldable, conditional affine not",
    composite=True, running_stat_names=("running_mean", "running_var"), mode_sensitive=True,
    no_fold_reason="{type}: its affine depends on a second input (condition/branch)",
))
register(NormKind(
    "sabn", (SandwichBatchNorm2d,), "batch", "N and spatial axes, per channel; per-branch affine",
    True, True, "partial", ("BatchNormalization", "Gather", "Mul", "Add"),
    "Sandwich BatchNorm: shared part foldable, per-branch affine only for a fixed branch",
    composite=True, running_stat_names=("running_mean", "running_var"), mode_sensitive=True,
    no_fold_reason="{type}: its affine depends on a second input (condition/branch)",
))


register(NormKind(
    "frn", (FilterResponseNorm2d,), "sample",
    "spatial axes, per sample and channel (mean of x^2) + TLU",
    False, True, "no", ("Mul", "ReduceMean", "Add", "Sqrt", "Div", "Max"),
    "Filter Response Norm + TLU", layout="conv",
    no_fold_reason="FilterResponseNorm: per-sample statistics and a TLU are not a fixed affine",
))


def _powernorm_eval(m: PowerNorm2d, eps: float):
    return arith.powernorm_affine(m.running_phi, getattr(m, "weight", None), getattr(m, "bias", None), eps)


register(NormKind(
    "powernorm", (PowerNorm2d,), "batch",
    "N and spatial axes, per channel (quadratic mean, no centring)",
    True, None, "yes", ("Mul", "Div", "Sqrt", "Add"),
    "PowerNorm (running quadratic mean at eval)",
    fold_family="bn_like", layout="conv", running_stat_names=("running_phi",),
    eval_affine_fn=_powernorm_eval, mode_sensitive=True,
))


# --------------------------------------------------------------------------- other libraries (by structure)

register(NormKind(
    "bn_act", (), "batch", "N and all spatial axes, per channel (dim 1), then drop + activation",
    None, None, "yes", ("BatchNormalization", "activation"),
    "timm BatchNormAct2d: BatchNorm2d, then its drop and act children (recognised by structure)",
    layout="conv", running_stat_names=("running_mean", "running_var"), eval_affine_fn=bn_eval_affine,
    fold_family="bn_like", mode_sensitive=True, recognise=L.is_bn_act, post_ops=("drop", "act"),
    class_names=("BatchNormAct2d", "SyncBatchNormAct"), class_base=nn.BatchNorm2d, convert_default=True,
))
register(NormKind(
    "gn_act", (), "sample", "each group's channels and spatial axes, per sample, then drop + activation",
    False, None, "no", ("Reshape", "InstanceNormalization", "Mul", "Add", "activation"),
    "timm GroupNormAct: GroupNorm, then its drop and act children (recognised by structure)",
    layout="conv", recognise=L.is_gn_act, post_ops=("drop", "act"),
    class_names=("GroupNormAct", "GroupNorm1Act"), class_base=nn.GroupNorm,
    no_fold_reason="{type}: per-sample statistics, and its activation sits between the affine and "
                   "the next layer",
))
register(NormKind(
    "ln2d", (), "sample", "the channels (dim 1) at each position of an NCHW tensor, per sample",
    False, None, "affine_only", ("Transpose", "LayerNormalization", "Transpose"),
    "LayerNorm2d (torchvision ConvNeXt, timm; HF ConvNextLayerNorm channels_first): LayerNorm over "
    "the channels of an NCHW tensor (recognised by structure)",
    layout="conv", recognise=L.is_ln2d, class_names=("LayerNorm2d",), class_base=nn.LayerNorm,
    fold_family="affine_only",  # its per-channel affine (dim 1) folds into the following conv / Linear
))
register(NormKind(
    "frn_act", (), "sample", "spatial axes, per sample and channel (mean of x^2), then TLU / act",
    False, True, "no", ("Mul", "ReduceMean", "Add", "Sqrt", "Div", "Max"),
    "timm FilterResponseNormAct2d / FilterResponseNormTlu2d: FRN, then its act child or a TLU "
    "(recognised by structure)",
    layout="conv", recognise=L.is_frn_act, post_ops=("act",),
    class_names=("FilterResponseNormAct2d", "FilterResponseNormTlu2d"),
    no_fold_reason="{type}: per-sample statistics and a TLU/activation are not a fixed affine",
))
register(NormKind(
    "evonorm", (), "sample",
    "B*: batch variance over N,H,W (running at eval) and per-sample variance over H,W; "
    "S*: per-sample group std, gated by x*sigmoid(v*x)",
    None, True, "no", ("Sigmoid", "ReduceMean", "Max", "Div", "Mul", "Add"),
    "EvoNorm (Liu et al. 2020; timm EvoNorm2dB0..S2a): normalisation and activation in one layer; "
    "B0: x / max(sqrt(var_NHW + eps), v*x + sqrt(var_HW + eps)) * gamma + beta; "
    "S0: x * sigmoid(v*x) / group_std(x) * gamma + beta",
    recognise=L.is_evonorm, mode_sensitive=None, running_stat_names=("running_var",),
    class_names=("EvoNorm2dB0", "EvoNorm2dB1", "EvoNorm2dB2", "EvoNorm2dS0", "EvoNorm2dS0a", "EvoNorm2dS1",
                 "EvoNorm2dS1a", "EvoNorm2dS2", "EvoNorm2dS2a"),
    no_fold_reason="{type}: per-sample statistics and a non-linear gate are not a fixed affine",
))


# --------------------------------------------------------------------------- per-module facts

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


_bn_eval = bn_eval_affine  # the old private name
