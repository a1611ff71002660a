"""Norms of other libraries, recognised by their structure (never as their base class).

timm's ``BatchNormAct2d`` *is* a ``BatchNorm2d`` subclass, but its forward also applies
``self.drop`` and ``self.act``; treating it as its base (what ``SyncBatchNorm.
convert_sync_batchnorm`` does) silently drops the activation.  Each kind here has a
recogniser that checks the class name, the base, the attributes and the children the
library's forward uses; anything else that subclasses a known norm stays
``unsupported_subclass``.

The recognisers are here; the kinds are registered with them in :mod:`normswap.norms`.
"""

from __future__ import annotations

import re

import torch
from torch import nn


__all__ = ["is_bn_act", "is_gn_act", "is_ln2d", "is_frn_act", "is_evonorm", "is_same_padding_conv",
           "probe_output_channel_affine", "is_frozen_bn", "is_custom_norm", "looks_like_norm_name"]


def _names(m: nn.Module, kind: str) -> set[str]:
    if kind == "children":
        return {n for n, _ in m.named_children()}
    if kind == "params":
        return {n for n, _ in m.named_parameters(recurse=False)}
    return {n for n, _ in m.named_buffers(recurse=False)}


def _only(m: nn.Module, *, children=(), params=(), buffers=None) -> bool:
    if not _names(m, "children") <= set(children):
        return False
    if not _names(m, "params") <= set(params):
        return False
    return buffers is None or _names(m, "buffers") <= set(buffers)


_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def is_bn_act(m: nn.Module) -> bool:
    # timm.layers.norm_act.BatchNormAct2d / SyncBatchNormAct: BN forward, then drop, then act
    return (isinstance(m, nn.modules.batchnorm._BatchNorm)
            and type(m).__name__ in ("BatchNormAct2d", "SyncBatchNormAct")
            and _only(m, children=("drop", "act"), params=("weight", "bias"), buffers=_BN_BUFFERS))


def is_gn_act(m: nn.Module) -> bool:
    # timm GroupNormAct / GroupNorm1Act: GroupNorm forward, then drop, then act
    return (type(m).__name__ in ("GroupNormAct", "GroupNorm1Act") and isinstance(m, nn.GroupNorm)
            and _only(m, children=("drop", "act"), params=("weight", "bias"), buffers=()))


def is_ln2d(m: nn.Module) -> bool:
    name = type(m).__name__
    if name == "LayerNorm2d" and isinstance(m, nn.LayerNorm):
        # torchvision ConvNeXt / timm: permute NCHW -> NHWC, F.layer_norm over C, permute back
        return len(tuple(m.normalized_shape)) == 1 and _only(m, params=("weight", "bias"), buffers=())
    if name in ("ConvNextLayerNorm", "ConvNextV2LayerNorm"):
        # Hugging Face: data_format "channels_first" normalises C of an NCHW tensor
        return getattr(m, "data_format", None) == "channels_first" and _only(m, params=("weight", "bias"))
    return False


def is_frn_act(m: nn.Module) -> bool:
    name = type(m).__name__
    if name == "FilterResponseNormAct2d":
        return _only(m, children=("act",), params=("weight", "bias", "eps"))
    if name == "FilterResponseNormTlu2d":
        return _only(m, params=("weight", "bias", "tau", "eps"))
    return False


_EVO = re.compile(r"^EvoNorm2d(B0|B1|B2|S0|S0a|S1|S1a|S2|S2a)$")


def is_evonorm(m: nn.Module) -> bool:
    return bool(_EVO.match(type(m).__name__)) and _only(m, children=("act",), params=("weight", "bias", "v"))


# --------------------------------------------------------------------------- library convs

_SAME_PAD_CONVS = ("Conv2dSame", "Conv2dStaticSamePadding", "Conv2dDynamicSamePadding")


def is_same_padding_conv(m: nn.Module) -> bool:
    """timm's ``Conv2dSame`` / EfficientNet-PyTorch's ``Conv2d{Static,Dynamic}SamePadding``,
    recognised by structure: an ``nn.Conv2d`` subclass whose forward zero-pads its *input*
    ('same' padding, possibly asymmetric) and then calls ``F.conv2d(x, self.weight, self.bias,
    self.stride, ..., self.dilation, self.groups)``; no parameters or children of its own beside
    ``weight``/``bias`` and a zero ``static_padding``.  Its output channel ``o`` is then
    ``conv(x)[o]`` of its own weight row ``o`` and bias ``o``: a per-channel affine after it folds
    into its weights exactly."""
    if type(m).__name__ not in _SAME_PAD_CONVS or not isinstance(m, nn.Conv2d):
        return False
    if not _only(m, children=("static_padding",), params=("weight", "bias"), buffers=()):
        return False
    pad = getattr(m, "static_padding", None)
    if pad is None:
        return True
    if type(pad) is nn.Identity or type(pad) is nn.ZeroPad2d:
        return True
    return type(pad) is nn.ConstantPad2d and float(pad.value) == 0.0


def probe_output_channel_affine(m: nn.Module) -> str | None:
    """Check on a random probe that ``m``'s output channel ``o`` is ``conv(x; weight[o], bias[o])``:
    scaling weight row ``o`` by ``s[o]`` and mapping ``bias -> s*bias + t`` must give ``s*y + t``.
    Backs up the structural recognition of a library conv (a class merely *named* Conv2dSame
    whose forward does something else fails it).  The parameters are restored bit for bit."""
    import torch

    w, b = m.weight, m.bias
    if w is None or w.dim() != 4:
        return "weight is not a 4-D conv weight"
    g = torch.Generator().manual_seed(0)
    kh, kw = w.shape[-2:]
    side = max(9, int(kh) * 2 + 3, int(kw) * 2 + 3)
    x = torch.randn((1, w.shape[1] * m.groups, side, side), generator=g, dtype=w.dtype)
    s = torch.rand(w.shape[0], generator=g, dtype=w.dtype) + 0.5
    t = torch.randn(w.shape[0], generator=g, dtype=w.dtype)
    w0 = w.detach().clone()
    b0 = b.detach().clone() if b is not None else None
    was = m.training
    try:
        m.eval()
        with torch.no_grad():
            y = m(x)
            w.mul_(s.view(-1, 1, 1, 1))
            if b is not None:
                b.mul_(s).add_(t)
            y2 = m(x)
    except Exception as e:  # noqa: BLE001
        return f"its forward failed on a probe input ({type(e).__name__})"
    finally:
        with torch.no_grad():
            w.copy_(w0)
            if b is not None:
                b.copy_(b0)
        m.train(was)
    if not isinstance(y, torch.Tensor) or y.dim() != 4 or y.shape[1] != w.shape[0]:
        return "its output is not (N, out_channels, H, W)"
    expect = y * s.view(1, -1, 1, 1) + (t.view(1, -1, 1, 1) if b is not None else 0)
    tol = 1e-4 * (1 + float(expect.abs().max()))
    if float((y2 - expect).abs().max()) > tol:
        return "a probe shows its output channels are not an affine of its own weight rows"
    return None



# --------------------------------------------------------------------------- norms by structure

_FROZEN_NAME = re.compile(r"(?i)frozen|batch_?norm|(^|[^a-z])bn")
_CUSTOM_NAME = re.compile(r"(?i)norm")
_NOT_NORM_NAME = re.compile(r"(?i)normali[sz]e$|^(pre|post)norm|norm(block|layerwrapper)$")


def is_frozen_bn(module: nn.Module) -> bool:
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


def is_custom_norm(module: nn.Module) -> bool:
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


def looks_like_norm_name(class_name: str) -> bool:
    """Does a class name look like a norm's (``*Norm*``, not ``Normalize``/``PreNorm``)?"""
    return bool(_CUSTOM_NAME.search(class_name)) and not _NOT_NORM_NAME.search(class_name)
