"""Fold arithmetic (the foundation layer): pure tensor functions, no graph surgery (like ``torch.nn.utils.fusion``).

Every function computes in float64 and returns float64 tensors; callers cast back to the
parameter dtype with :func:`cast_like`.  A per-channel eval-time affine is ``y = s * x + t``
(``s`` = scale, ``t`` = shift, both of shape (C,)).

Weight layouts (PyTorch):

* ``Conv{1,2,3}d``: ``(out, in/groups, *k)``; output channel ``o`` belongs to group
  ``o // (out/groups)`` and reads input channels ``g*(in/groups) + j``.
* ``ConvTranspose{1,2,3}d``: ``(in, out/groups, *k)``; output channel ``g*(out/groups) + j``
  is column ``j`` of the rows of group ``g``.  (``torch.nn.utils.fusion.fuse_conv_bn_weights
  (transpose=True)`` scales dim 1 by the whole scale vector, which is wrong for groups > 1.)
* ``Linear``: ``(out, in)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "f64",
    "cast_like",
    "bn_affine",
    "powernorm_affine",
    "bgn_affine",
    "is_finite",
    "fold_affine_after_conv",
    "fold_affine_after_conv_transpose",
    "fold_affine_after_linear",
    "fold_affine_before_conv",
    "fold_affine_before_linear",
]


def f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def cast_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in ``like``'s dtype and device."""
    return t.to(dtype=like.dtype, device=like.device)


def is_finite(*ts: Tensor | None) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in ts)


def bn_affine(running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
              bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """Eval BatchNorm as ``(s, t)``: ``s = w / sqrt(var + eps)``, ``t = b - mean * s`` (float64)."""
    mean, var = f64(running_mean), f64(running_var)
    w = f64(weight) if weight is not None else torch.ones_like(mean)
    b = f64(bias) if bias is not None else torch.zeros_like(mean)
    s = w / torch.sqrt(var + float(eps))
    return s, b - mean * s


def powernorm_affine(running_phi: Tensor, weight: Tensor | None, bias: Tensor | None,
                     eps: float) -> tuple[Tensor, Tensor]:
    """Eval PowerNorm (no centring): ``s = w / sqrt(phi + eps)``, ``t = b``."""
    phi = f64(running_phi)
    w = f64(weight) if weight is not None else torch.ones_like(phi)
    b = f64(bias) if bias is not None else torch.zeros_like(phi)
    return w / torch.sqrt(phi + float(eps)), b


def bgn_affine(running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
               bias: Tensor | None, eps: float, num_features: int) -> tuple[Tensor, Tensor]:
    """Eval Batch Group Norm: per-group statistics expanded to channels (C/G per group)."""
    g = running_mean.numel()
    per = num_features // g
    mean = f64(running_mean).repeat_interleave(per)
    var = f64(running_var).repeat_interleave(per)
    return bn_affine(mean, var, weight, bias, eps)


def _bias64(bias: Tensor | None, n: int, like: Tensor) -> Tensor:
    """A layer's bias in float64, or zeros of length ``n`` for a layer without one."""
    return f64(bias) if bias is not None else torch.zeros(n, dtype=torch.float64, device=like.device)


def _bcast(v: Tensor, n: int) -> Tensor:
    """A scale/shift of n entries (a 1-element one broadcasts)."""
    v = v.reshape(-1)
    return v.expand(n) if v.numel() == 1 and n != 1 else v


# --------------------------------------------------------------------------- affine after a layer


def fold_affine_after_conv(weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor
                           ) -> tuple[Tensor, Tensor]:
    """``s * conv(x) + t`` as one conv: scale output channels (dim 0), any groups."""
    w = f64(weight)
    out = w.shape[0]
    s, t = _bcast(s, out), _bcast(t, out)
    b = _bias64(bias, out, w)
    w2 = w * s.reshape((-1,) + (1,) * (w.dim() - 1))
    return w2, b * s + t


def fold_affine_after_conv_transpose(weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor,
                                     groups: int) -> tuple[Tensor, Tensor]:
    """``s * conv_transpose(x) + t`` as one transposed conv; weight ``(in, out/groups, *k)``."""
    w = f64(weight)
    cin, opg = w.shape[0], w.shape[1]
    out = opg * groups
    s, t = _bcast(s, out), _bcast(t, out)
    b = _bias64(bias, out, w)
    k = tuple(w.shape[2:])
    wg = w.reshape((groups, cin // groups, opg) + k)
    w2 = wg * s.reshape((groups, 1, opg) + (1,) * len(k))
    return w2.reshape(w.shape), b * s + t


def fold_affine_after_linear(weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor
                             ) -> tuple[Tensor, Tensor]:
    """``s * linear(x) + t`` as one linear (``s``, ``t`` over the output features): the weight
    ``(out, in)`` scales like a conv's ``(out, in, *k)`` along dim 0."""
    return fold_affine_after_conv(weight, bias, s, t)


# --------------------------------------------------------------------------- affine before a layer


def fold_affine_before_linear(weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor
                              ) -> tuple[Tensor, Tensor]:
    """``linear(s * x + t)`` as one linear (``s``, ``t`` over the input features)."""
    w = f64(weight)
    out, cin = w.shape
    s, t = _bcast(s, cin), _bcast(t, cin)
    b = _bias64(bias, out, w)
    return w * s[None, :], b + w @ t


def fold_affine_before_conv(weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor,
                            groups: int) -> tuple[Tensor, Tensor]:
    """``conv(s * x + t)`` as one conv, per input channel, any groups.

    Exact only when the conv never sees padded zeros (padding 0, or a padding mode
    ('replicate', 'reflect', 'circular') that pads with values of the affine's output):
    a per-channel constant ``t`` then contributes ``sum_{j,k} W[o, j, k] * t_j`` at every
    output position.  The caller checks that.
    """
    w = f64(weight)
    out, ipg = w.shape[0], w.shape[1]
    cin = ipg * groups
    s, t = _bcast(s, cin), _bcast(t, cin)
    b = _bias64(bias, out, w)
    k = tuple(w.shape[2:])
    wg = w.reshape((groups, out // groups, ipg) + k)
    ones_k = (1,) * len(k)
    w2 = wg * s.reshape((groups, 1, ipg) + ones_k)
    db = (wg * t.reshape((groups, 1, ipg) + ones_k)).reshape(out, -1).sum(dim=1)
    return w2.reshape(w.shape), b + db
