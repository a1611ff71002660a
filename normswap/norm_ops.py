"""One table of functional / aten norm signatures, shared by every graph reader.

The FX reader sees Python functions (``F.batch_norm``), TorchScript sees node kinds
(``aten::batch_norm``), ``torch.export`` sees ATen overloads
(``aten._native_batch_norm_legit_no_training.default``).  Each is looked up here with
:func:`op_signature` and its arguments bound to *roles* (input, weight, bias, running_mean,
running_var, training, eps) with :func:`bind` -- no reader hard-codes an argument index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["OpSig", "OPS", "op_signature", "op_name", "bind", "is_norm_op"]

ROLES = ("input", "weight", "bias", "running_mean", "running_var", "training", "eps")


@dataclass(frozen=True)
class OpSig:
    """A norm op: its kind and its parameters in positional order.

    ``roles`` maps a role to the parameter name holding it where the two differ
    (``use_input_stats`` is instance_norm's ``training``; cudnn calls eps ``epsilon``).
    ``training`` is the fixed training flag of ops that have no such argument.
    """

    name: str
    kind: str
    params: tuple[str, ...]
    defaults: tuple[tuple[str, Any], ...] = ()
    roles: tuple[tuple[str, str], ...] = ()
    training: bool | None = None

    def param(self, role: str) -> str | None:
        p = dict(self.roles).get(role, role)
        return p if p in self.params else None

    def index(self, role: str) -> int | None:
        p = self.param(role)
        return None if p is None else self.params.index(p)


_BN_ATEN = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
_BN_NO_TRAIN = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")
_IN_ATEN = ("input", "weight", "bias", "running_mean", "running_var", "use_input_stats", "momentum",
            "eps", "cudnn_enabled")

_SIGS = [
    # Python functionals (FX call_function targets); names are the functions' own
    OpSig("F.batch_norm", "bn", ("input", "running_mean", "running_var", "weight", "bias", "training",
                                 "momentum", "eps"),
          (("weight", None), ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5))),
    OpSig("F.instance_norm", "in", ("input", "running_mean", "running_var", "weight", "bias",
                                    "use_input_stats", "momentum", "eps"),
          (("running_mean", None), ("running_var", None), ("weight", None), ("bias", None),
           ("use_input_stats", True), ("momentum", 0.1), ("eps", 1e-5)),
          roles=(("training", "use_input_stats"),)),
    OpSig("F.layer_norm", "ln", ("input", "normalized_shape", "weight", "bias", "eps"),
          (("weight", None), ("bias", None), ("eps", 1e-5)), training=False),
    OpSig("F.group_norm", "gn", ("input", "num_groups", "weight", "bias", "eps"),
          (("weight", None), ("bias", None), ("eps", 1e-5)), training=False),
    OpSig("F.rms_norm", "rms", ("input", "normalized_shape", "weight", "eps"),
          (("weight", None), ("eps", None)), training=False),
    OpSig("F.local_response_norm", "lrn", ("input", "size", "alpha", "beta", "k"),
          (("alpha", 1e-4), ("beta", 0.75), ("k", 1.0)), training=False),
    # ATen (TorchScript node kinds, torch.export overloads, torch.* functions)
    OpSig("aten::batch_norm", "bn", _BN_ATEN + ("cudnn_enabled",)),
    OpSig("aten::_batch_norm_impl_index", "bn", _BN_ATEN + ("cudnn_enabled",)),
    OpSig("aten::native_batch_norm", "bn", _BN_ATEN),
    OpSig("aten::_native_batch_norm_legit", "bn", _BN_ATEN),
    OpSig("aten::_native_batch_norm_legit.no_stats", "bn",
          ("input", "weight", "bias", "training", "momentum", "eps")),
    OpSig("aten::_native_batch_norm_legit_functional", "bn", _BN_ATEN),
    OpSig("aten::_native_batch_norm_legit_no_training", "bn", _BN_NO_TRAIN, training=False),
    OpSig("aten::_batch_norm_no_update", "bn", _BN_NO_TRAIN, training=False),
    OpSig("aten::_batch_norm_with_update", "bn", _BN_NO_TRAIN, training=True),
    OpSig("aten::_batch_norm_with_update_functional", "bn", _BN_NO_TRAIN, training=True),
    OpSig("aten::cudnn_batch_norm", "bn", ("input", "weight", "bias", "running_mean", "running_var",
                                           "training", "exponential_average_factor", "epsilon"),
          roles=(("eps", "epsilon"),)),
    OpSig("aten::miopen_batch_norm", "bn", ("input", "weight", "bias", "running_mean", "running_var",
                                            "training", "exponential_average_factor", "epsilon"),
          roles=(("eps", "epsilon"),)),
    OpSig("aten::instance_norm", "in", _IN_ATEN, roles=(("training", "use_input_stats"),)),
    OpSig("aten::layer_norm", "ln", ("input", "normalized_shape", "weight", "bias", "eps",
                                     "cudnn_enable"),
          (("weight", None), ("bias", None), ("eps", 1e-5)), training=False),
    OpSig("aten::native_layer_norm", "ln", ("input", "normalized_shape", "weight", "bias", "eps"),
          training=False),
    OpSig("aten::group_norm", "gn", ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"),
          (("weight", None), ("bias", None), ("eps", 1e-5)), training=False),
    OpSig("aten::native_group_norm", "gn", ("input", "weight", "bias", "N", "C", "HxW", "group", "eps"),
          training=False),
    OpSig("aten::rms_norm", "rms", ("input", "normalized_shape", "weight", "eps"),
          (("weight", None), ("eps", None)), training=False),
    OpSig("aten::_fused_rms_norm", "rms", ("input", "normalized_shape", "weight", "eps"),
          training=False),
]

#: name -> signature (names: "F.batch_norm", "aten::batch_norm", "aten::x.overload")
OPS: dict[str, OpSig] = {s.name: s for s in _SIGS}


def _python_functions() -> dict:
    import torch
    import torch.nn.functional as F

    out = {}
    for fname in ("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm",
                  "local_response_norm"):
        fn = getattr(F, fname, None)
        if fn is not None:
            out[fn] = f"F.{fname}"
    for fname in ("batch_norm", "native_batch_norm", "instance_norm", "layer_norm", "native_layer_norm",
                  "group_norm", "native_group_norm", "rms_norm"):
        fn = getattr(torch, fname, None)
        if fn is not None:
            out[fn] = f"aten::{fname}"
    return out


_PY: dict | None = None


def op_name(target: Any) -> str | None:
    """The table name of a call target: a Python function, an ATen overload / packet, or a
    TorchScript node kind string; None when it is not a norm op."""
    global _PY
    if isinstance(target, str):
        if target in OPS:
            return target
        base = target.split(".")[0] if target.startswith("aten::") else None
        return base if base in OPS else None
    schema = getattr(target, "_schema", None)
    if schema is not None:  # OpOverload
        n = f"{schema.name}.{schema.overload_name}" if schema.overload_name else schema.name
        if n in OPS:
            return n
        return schema.name if schema.name in OPS else None
    qn = getattr(target, "_qualified_op_name", None)  # OpOverloadPacket
    if isinstance(qn, str):
        return qn if qn in OPS else None
    if _PY is None:
        _PY = _python_functions()
    try:
        return _PY.get(target)
    except TypeError:
        return None


def op_signature(target: Any) -> OpSig | None:
    n = op_name(target)
    return OPS.get(n) if n is not None else None


def is_norm_op(target: Any) -> bool:
    return op_name(target) is not None


_MISSING = object()


def bind(sig: OpSig, args: tuple | list, kwargs: dict | None = None) -> dict[str, Any]:
    """Role -> argument value of one call (defaults filled in; absent roles omitted).
    ``training`` is always present when the op fixes it."""
    kwargs = kwargs or {}
    by_param: dict[str, Any] = dict(sig.defaults)
    for p, a in zip(sig.params, args):
        by_param[p] = a
    for k, v in kwargs.items():
        if k in sig.params:
            by_param[k] = v
    out: dict[str, Any] = {}
    for role in ROLES:
        p = sig.param(role)
        if p is not None and p in by_param:
            out[role] = by_param[p]
    if sig.training is not None:
        out["training"] = sig.training
    return out
