"""The one catalogue of fold reasons: a code and a text template per reason.

Every "this norm is not folded because ..." comes from here: :func:`reason` builds a
:class:`Reason`, a ``str`` (the text users read, unchanged in reports) that also carries its
``code`` (what JSON reports and tests key on).  A composite reason (``"<why>; after it: <why>"``)
keeps the code of its first part (:func:`join`).  No module writes a reason text of its own.
"""

from __future__ import annotations

__all__ = ["Reason", "reason", "join", "code_of", "CATALOGUE", "TRAIN_HINT"]

TRAIN_HINT = "pass eval=True / --eval-mode"

#: code -> text template (``str.format`` fields)
CATALOGUE: dict[str, str] = {
    # ---- the norm itself (kind-level: the registry)
    "kind_not_foldable": "{kind}: not a foldable norm",
    "kind_refused": "{text}",
    "unsupported_subclass": ("unsupported subclass {type} of {base}: its forward may do more than normalise "
                             "(exact types only)"),
    "custom_forward_unknown": "custom norm {type}: its forward is unknown",
    "no_running_stats": "track_running_stats=False: it normalises with batch statistics even in eval",
    "in_no_running_stats": "InstanceNorm without running statistics",
    "in_per_sample": "InstanceNorm without running statistics: per-sample statistics are not a fixed affine",
    "no_eval_affine": "{kind}: no eval-time affine",
    "lazy_norm": "uninitialized lazy norm",
    "missing_stat": "missing running statistic {name}",
    "negative_stat": "negative {name} (min {min}): broken statistics",
    "nonfinite_stats": "non-finite statistics (NaN/Inf in running stats or affine, or var + eps <= 0)",
    "nonfinite_affine": "non-finite affine parameters",
    "broken_stats": "{problem}: not folded (the statistics are broken)",
    "no_affine": "no affine to fold (elementwise_affine/affine is off)",
    "identity_affine": "its affine is already the identity: nothing to fold",
    "multi_dim_shape": "normalized_shape {shape} spans several dims: its affine is not per-feature of one layer",
    "norm_tied": ("its {param} is shared (tied) with {others}: resetting it to the identity would change "
                  "that module"),
    # ---- the norm's state in this graph
    "norm_hooks": "the norm has hooks registered",
    "model_training": "the model is in training mode ({hint} to fold its eval-mode behaviour)",
    "model_training_short": "the model is in training mode ({hint})",
    "norm_training": "the norm is in training mode ({hint})",
    "program_training": "the program runs this BatchNorm in training mode (batch statistics): {hint}",
    "training_computed": "its training flag is computed in the graph",
    "not_called": "not called in the traced graph",
    "untraceable_region": "inside untraceable region '{region}'{error}: its producer cannot be proven",
    "direct_use": ("{what} '{name}': its {attr} is also read directly ('{use}'), so changing it would change "
                   "that other use"),
    "untraced_calls": ("{what} '{name}' ran {actual} times on the example inputs but the traced graphs account "
                       "for {expected}: it is also called from code that could not be traced"),
    "untraced_reach": ("{what} '{name}' is reachable as '{alias}' from untraceable region '{region}', whose "
                       "code may call it directly: its calls cannot all be seen (pass example inputs to count "
                       "them)"),
    "extra_args": "the norm is called with extra arguments",
    "composite_inner": ("its conditional affine depends on a second input; its BatchNorm statistics were not "
                        "folded either: {inner}"),
    "no_inner_bn": "{type} has no plain BatchNorm2d 'bn' inside",
    "post_ops": "its own {what} follows the normalisation: only a fold into the layer before it is exact",
    "no_rule": "no fold rule for {kind}",
    "not_applicable": "{text}",
    # ---- producer / consumers
    "input_not_layer": "its input is {input}, not a {what}",
    "nothing_before": "nothing foldable before it (its input is {input}); after it: {after}",
    "after_it": "{first}; after it: {rest}",
    "different_producers": ("the norm is called at several places with different producers ('{a}', '{b}')"),
    "producer_users": "the output of '{layer}' is used by more than one consumer{users}",
    "producer_call_sites": "'{layer}' is called at several places whose call sites differ{detail}",
    "called_at_places": "the norm is called at {calls} places ({note})",
    "output_unused": "its output is unused",
    "feeds_other": "its output feeds {user}, not a {what}",
    "feeds_non_input": "its output feeds {user} in a non-input position",
    "feeds_residual": ("its output also feeds a residual/skip path ({user}): folding its affine into the "
                       "Linear(s) would change that use"),
    "feeds_several": "its output feeds several layers ({layers})",
    "consumer_call_sites": "'{layer}' is called at several places whose call sites differ (one call reads {input})",
    # ---- the layer
    "layer_reparam": "'{layer}' has a reparametrised weight ({reparam}), not a plain parameter{hint}",
    "layer_reparam_short": "'{layer}' has a reparametrised weight, not a plain parameter",
    "layer_parametrized": "'{layer}' has parametrized weights, not plain parameters",
    "layer_probe": "'{layer}' ({type}): {problem}",
    "layer_quantized": "'{layer}' ({type}) is quantized: its weights are not plain parameters",
    "layer_subclass": "'{layer}' is an unsupported subclass {type} (exact layer types only)",
    "layer_unsupported": "'{layer}' ({type}) is not a supported layer",
    "layer_hooks": "'{layer}' has hooks registered, its weights may not be what runs",
    "layer_hooks_short": "'{layer}' has hooks registered",
    "layer_lazy": "'{layer}' is an uninitialized lazy module",
    "layer_not_param": "'{layer}' weights are not plain parameters ({type})",
    "layer_not_float": "'{layer}' weights are not floating point (quantized?)",
    "layer_not_plain": "'{layer}' weights are not plain floating-point parameters",
    "layer_tied": "'{layer}' shares (ties) its parameters with {others}",
    "layer_weight_shared": "the {param} of '{layer}' is shared (tied) with {user}: changing it would change that use",
    "layer_other_input": ("'{layer}' is also called on another input ({user} reads another value): one folded "
                          "weight cannot serve both"),
    "layer_weight_not_param": "the {param} of '{layer}' is {what}, not a parameter of the program",
    "layer_weight_not_state": "the weight of '{layer}' is not in the program's state",
    "layer_bias_shared": "the bias of '{layer}' is also used by {user}: changing it would change that use",
    "layer_group_differs": "the weight of '{layer}' is shared (tied) with '{other}', which feeds '{site}': one folded weight cannot serve both",
    "layer_group_unfolded": ("'{layer}' shares its weight with the layer before '{site}', which is not folded "
                             "({why})"),
    "layer_runtime_calls": ("'{layer}' ran {actual} times on the example inputs but the exported graph shows "
                            "{calls} calls reading the norm"),
    "layer_other_bias": "'{layer}' is called with another bias than its own",
    "addmm_scaled": "'{layer}' is an addmm with beta/alpha != 1",
    "weight_not_transposed": "its input is {input}, whose weight is not a transposed parameter",
    # ---- exactness (ranks, channels, padding)
    "rank_unknown": "input rank unknown: pass example inputs",
    "rank_unknown_program": "input rank unknown (no shape metadata in the program)",
    "unbatched": "'{layer}' is {what} unbatched input: the norm's dim 1 is not its channel axis",
    "rank_nlc": ("the norm sees rank-{rank} input (N, L, C): it normalises dim 1, not the output features "
                 "(last dim) of '{layer}'"),
    "rank_nlc_next": ("the norm sees rank-{rank} input: its channel axis (dim 1) is not the input feature axis "
                      "(last dim) of '{layer}'"),
    "dim1_not_features": "the norm normalises dim 1 ({channels} channels), not the output features of '{layer}' ({out})",
    "dim1_not_in_features": "the norm's channel axis (dim 1) is not the input feature axis of '{layer}'",
    "channel_mismatch": "channel mismatch: {detail}",
    "convtranspose_next": ("'{layer}' is a ConvTranspose: its border outputs receive fewer contributions, so the "
                           "shift is not a per-channel bias"),
    "conv_last_dim": "'{layer}' is a conv: the norm's affine is over the last dim, not channels",
    "zero_padding": "folding into '{layer}': zero padding {padding} would see un-normalised zeros",
    # ---- functional calls
    "functional_kind": "functional {kind} norm: only functional batch_norm is folded",
    "functional_unsupported": "unsupported functional batch_norm call ({target})",
    "functional_training": "functional batch_norm with training=True (or not a constant): uses batch statistics",
    "eps_not_constant": "eps is not a constant",
    "functional_no_stats": "functional batch_norm without running statistics",
    "not_constant_attr": "{role}: {what} is not a constant attribute",
    "functional_after_linear": "functional batch_norm after a Linear: its channel axis cannot be proven (no rank)",
    # ---- traced (subclassed) convolutions
    "traced_no_weight": "its input {where} does not read a module's weight directly",
    "traced_not_weight": "its input {where} reads an attribute that is not a module's weight",
    "traced_not_conv": "'{layer}' ({type}) is not a Conv1d/2d/3d",
    "traced_ignores_bias": "the call in '{layer}' ignores its bias",
    "traced_other_bias": "the call in '{layer}' does not use its own bias",
    "traced_not_plain": "'{layer}' {param} is not a plain floating-point parameter",
    "traced_tied": "'{layer}' shares (ties) its {param} with another module",
    "traced_read_twice": "'{layer}' {param} is read at more than one place in the traced graphs",
    "traced_weight_uses": "'{layer}' weights are used by more than the convolution call",
    "traced_conv_users": "the output of the convolution in '{layer}' is used by more than one consumer ({users})",
    "traced_called_elsewhere": "'{layer}' is also called as a module elsewhere",
    "traced_untraceable": "'{layer}' is reachable from untraceable region '{region}'",
    # ---- exported programs
    "saved_stats": "it uses the BatchNorm's saved statistics (output {index})",
    "tuple_output": "its tuple output is used by {user}",
    "role_not_state": "its {role} is {what}, not a parameter/buffer of the program",
    "role_missing": "its {role} is not in the program's state",
    "program_eps": "its eps is not a constant",
    "lowered": "{kind} lowered to primitive ops in an exported program: {what}",
    "program_op_kind": ("{kind}: only batch_norm, layer_norm and rms_norm ops are folded in an exported program "
                        "(fold the eager model)"),
    "export_failed": "torch.export on the example inputs failed too ({error})",
    "export_graph": "{text} (proven on the torch.export graph of the example inputs)",
    "export_hint": ("{text} (pass example inputs: normswap then proves its producers and consumers on a "
                    "torch.export graph of them)"),
    "export_graph_also": "{text}; {export}",
    "export_own_param": "a call of it in the exported graph does not use its own {role} ({node})",
    "export_shape": "it normalises over {shape} in the exported graph, not the last dim ({n})",
    "custom_not_rms": "custom norm {type}: {why}",
    "custom_more": "custom norm {type}: its forward computes more than an RMSNorm ({nodes})",
    "export_runtime_calls": "it ran {actual} times on the example inputs but the exported graph shows {calls} calls",
    "export_params_read": "its parameters are also read by {node}",
    "layer_not_placeholder": "the {param} of '{layer}' is not a placeholder of the exported program",
    "not_in_export": "it is not called in the exported graph",
    "not_placeholder": "its {what} is not a placeholder of the exported program",
    "normalised_unused": "its normalised output is unused",
    "consumer_weight": "a consumer's weight is {what}, not a parameter",
    "consumer_weight_owner": "a consumer's weight ({what}) is not a module's weight",
    # ---- compiled graphs (TorchScript)
    "compiled_unproven": "{text} (compiled graph: fold the eager model)",
    "compiled_affine_only": "{kind}: its affine can only move into the following Linear (compiled graph: fold the eager model)",
    "compiled_next": "folding into {layer} cannot be checked in a compiled graph (compiled graph: fold the eager model)",
    "compiled_reparam": "{kind} inside a compiled graph: {what}",
    "torchscript_submodule": "inside a TorchScript submodule (no eager module to rewrite)",
    # ---- weight reparametrisations
    "spectral_not_baked": "spectral norm: pass bake_spectral_norm=True / --bake-spectral-norm to bake W/sigma",
    "spectral_training": "the module is in training mode (its spectral norm iterates): pass eval=True / --eval-mode",
    "spectral_other": "other parametrizations on the same weight",
    "weight_std_not_baked": ("weight standardization: pass bake_weight_std=True / --bake-weight-std to bake the "
                             "standardised weight into a plain Conv2d"),
    "weight_std_same": ("{type}: its 'same' padding depends on the input size, so it cannot become a plain "
                        "Conv2d"),
    "weight_std_hooks": "the conv has hooks registered",
    "reparam_not_baked": "{kind}: not baked (only spectral norm and weight standardization are)",
    # ---- the whole result
    "verification_failed": "not applied: the folded program failed verification",
}


class Reason(str):
    """A reason text with its catalogue code (``reason.code``)."""

    code: str = "other"

    def __new__(cls, code: str, text: str):
        s = super().__new__(cls, text)
        s.code = code
        return s

    def __reduce__(self):
        return (Reason, (self.code, str(self)))


def reason(code: str, **fields) -> Reason:
    """The catalogue's reason ``code`` with its fields filled in."""
    return Reason(code, CATALOGUE[code].format(**fields))


def join(first: str, rest: str) -> Reason:
    """``"<first>; after it: <rest>"`` with the code of ``first``."""
    return Reason(code_of(first), CATALOGUE["after_it"].format(first=first, rest=rest))


def code_of(text) -> str | None:
    """The code of a reason (None for None; "other" for a plain string)."""
    if text is None:
        return None
    return getattr(text, "code", "other")
