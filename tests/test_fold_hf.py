"""Hugging Face-style transformers (untraceable by FX): LayerNorm / RMSNorm affines folded into
the following Linear / Conv1D, proven on a torch.export graph of the example inputs
(normswap.fold.export_graph).  Rebuilds in samples/hf_like.py; real ``transformers`` models
when it is installed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from normswap.fold import fold, plan
from samples import hf_like as H


def _max_rel_diff(a, b) -> float:
    from torch.utils._pytree import tree_leaves

    out = 0.0
    for x, y in zip(tree_leaves(a), tree_leaves(b)):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            out = max(out, float((x - y).abs().max()) / (1.0 + float(x.abs().max())))
    return out


def _run(model, ids):
    with torch.no_grad():
        return model(ids)


def _folded(rep) -> dict:
    return {f["norm"]: f for f in rep.folded}


def _skipped(rep) -> dict:
    return {s["norm"]: s["reason"] for s in rep.skipped}


def _check_equal(model, folded, ids):
    ref, out = _run(model, ids), _run(folded, ids)
    assert _max_rel_diff(ref, out) <= 1e-5


def _identity_affine(norm: nn.Module, cls: type):
    assert type(norm) is cls
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    if isinstance(getattr(norm, "bias", None), torch.Tensor):
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


# --------------------------------------------------------------------------- the samples are HF-like


@pytest.mark.parametrize("make", [
    lambda: H.BertLikeModel(), lambda: H.BertLikeModel(pre_ln=True), lambda: H.GPT2LikeModel(),
    lambda: H.GPT2LikeLMHeadModel(), lambda: H.LlamaLikeModel()])
def test_samples_are_untraceable_by_fx(make):
    model = make()
    assert H.fx_fails(model) is not None
    blocks = [m for m in model.modules() if type(m).__name__.endswith(("Layer", "Block", "Attention"))]
    assert blocks and all(H.fx_fails(b) is not None for b in blocks)


def test_without_export_nothing_folds_and_the_reason_hints_at_example_inputs():
    """No example inputs: still refused as untraceable, with a hint to pass them."""
    _, rep = fold(H.GPT2LikeModel())
    assert not rep.folded
    r = _skipped(rep)["h.0.ln_1"]
    assert "inside untraceable region" in r and "pass example inputs" in r
    _, rep = fold(H.LlamaLikeModel())
    r = _skipped(rep)["layers.0.input_layernorm"]
    assert "custom norm LlamaRMSNorm" in r and "pass example inputs" in r
    d = {x.norm: x for x in plan(H.BertLikeModel(pre_ln=True))}
    assert "pass example inputs" in d["layer.0.attention_LayerNorm"].reason


# --------------------------------------------------------------------------- foldable


def test_pre_ln_encoder_folds_into_qkv_and_intermediate():
    model, ids = H.BertLikeModel(pre_ln=True), H.example_ids()
    folded, rep = fold(model, ids)
    f = _folded(rep)
    for i in range(2):
        assert f[f"layer.{i}.attention_LayerNorm"]["into"] == (
            f"layer.{i}.attention.query, layer.{i}.attention.key, layer.{i}.attention.value")
        assert f[f"layer.{i}.output_LayerNorm"]["into"] == f"layer.{i}.intermediate"
        assert f[f"layer.{i}.output_LayerNorm"]["pattern"] == "norm_affine_linear"
        _identity_affine(folded.layer[i].attention_LayerNorm, nn.LayerNorm)
    assert len(rep.folded) == 4
    assert rep.verification["ok"]
    assert any("torch.export" in n for n in rep.notes)
    _check_equal(model, folded, ids)
    # the user's model is untouched, the folded one is eager
    assert not torch.equal(model.layer[0].attention_LayerNorm.weight, folded.layer[0].attention_LayerNorm.weight)
    assert type(folded) is H.BertLikeModel


def test_gpt2_folds_into_conv1d():
    model, ids = H.GPT2LikeModel(), H.example_ids()
    folded, rep = fold(model, ids)
    f = _folded(rep)
    assert set(f) == {"h.0.ln_1", "h.0.ln_2", "h.1.ln_1", "h.1.ln_2"}
    assert f["h.0.ln_1"]["into"] == "h.0.attn.c_attn" and f["h.1.ln_2"]["into"] == "h.1.mlp.c_fc"
    assert "graph output" in _skipped(rep)["ln_f"]
    _identity_affine(folded.h[0].ln_1, nn.LayerNorm)
    assert type(folded.h[0].attn.c_attn) is H.Conv1D
    _check_equal(model, folded, ids)
    # a second batch/length than the example (the fold does not depend on the shapes)
    _check_equal(model, folded, H.example_ids(batch=3, seq=11, seed=1))


def test_llama_rmsnorm_folds_into_qkv_and_gate_up():
    model, ids = H.LlamaLikeModel(), H.example_ids()
    folded, rep = fold(model, ids)
    f = _folded(rep)
    assert f["layers.0.input_layernorm"]["into"] == (
        "layers.0.self_attn.q_proj, layers.0.self_attn.k_proj, layers.0.self_attn.v_proj")
    assert f["layers.1.post_attention_layernorm"]["into"] == "layers.1.mlp.gate_proj, layers.1.mlp.up_proj"
    assert f["layers.0.input_layernorm"]["kind"] == "custom"
    assert len(rep.folded) == 4 and "graph output" in _skipped(rep)["norm"]
    _identity_affine(folded.layers[0].input_layernorm, H.LlamaLikeRMSNorm)
    assert folded.layers[0].self_attn.q_proj.bias is None  # an RMSNorm has no shift: no bias appears
    _check_equal(model, folded, ids)


def test_plan_agrees_with_fold():
    model, ids = H.GPT2LikeModel(), H.example_ids()
    decisions = {d.norm: d for d in plan(model, example_inputs=ids)}
    _, rep = fold(model, ids)
    assert {n for n, d in decisions.items() if d.reason is None} == set(_folded(rep))
    assert torch.equal(model.h[0].ln_1.weight, H.GPT2LikeModel().h[0].ln_1.weight)  # plan changes nothing


def test_untied_lm_head_folds_final_norm():
    model, ids = H.GPT2LikeLMHeadModel(tie=False), H.example_ids()
    folded, rep = fold(model, ids)
    assert _folded(rep)["transformer.ln_f"]["into"] == "lm_head"
    assert folded.lm_head.bias is not None  # the LayerNorm shift became a bias
    _check_equal(model, folded, ids)


def test_custom_norm_in_traceable_model_is_proven_with_inputs():
    model = nn.Sequential(nn.Linear(8, 16), H.LlamaLikeRMSNorm(16), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 8)
    _, rep = fold(model)
    assert "custom norm LlamaRMSNorm" in _skipped(rep)["1"]
    folded, rep = fold(model, x)
    assert _folded(rep)["1"]["into"] == "2"
    assert _max_rel_diff(_run(model, x), _run(folded, x)) <= 1e-5


def test_unregistered_dataclass_output():
    """A dataclass output torch.export does not know is flattened for the export only."""

    @dataclasses.dataclass
    class Out:
        y: torch.Tensor

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 3)
            with torch.no_grad():
                self.ln.weight.uniform_(0.5, 1.5)
                self.ln.bias.uniform_(-1, 1)

        def forward(self, x, **kwargs):
            if x.shape[1] > 100:
                raise ValueError
            return Out(self.fc(self.ln(x)))

    model, x = M().eval(), torch.randn(2, 4, 8)
    folded, rep = fold(model, x)
    assert _folded(rep)["ln"]["into"] == "fc"
    assert float((_run(model, x).y - _run(folded, x).y).abs().max()) <= 1e-5


# --------------------------------------------------------------------------- refused, one test per reason


def test_post_ln_bert_refused_residual_reads_norm_output():
    model, ids = H.BertLikeModel(), H.example_ids()
    folded, rep = fold(model, ids)
    assert not rep.folded
    s = _skipped(rep)
    for name in ("embeddings.LayerNorm", "layer.0.attention_LayerNorm", "layer.0.output_LayerNorm"):
        assert "residual" in s[name] and "torch.export" in s[name], s[name]
    _check_equal(model, folded, ids)


def test_refused_consumer_not_a_linear():
    _, rep = fold(H.GPT2LikeModel(), H.example_ids())
    assert "not a Linear" in _skipped(rep)["ln_f"]

    class M(nn.Module):  # LayerNorm -> GELU -> Linear
        def __init__(self):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 3)
            with torch.no_grad():
                self.ln.weight.uniform_(0.5, 1.5)

        def forward(self, x, **kwargs):
            if x.shape[1] > 100:
                raise ValueError
            return self.fc(torch.nn.functional.gelu(self.ln(x)))

    _, rep = fold(M().eval(), torch.randn(2, 3, 8))
    assert "aten.gelu" in _skipped(rep)["ln"] and "not a Linear" in _skipped(rep)["ln"]


def test_refused_tied_linear_weights():
    model, ids = H.GPT2LikeLMHeadModel(tie=True), H.example_ids()
    folded, rep = fold(model, ids)
    r = _skipped(rep)["transformer.ln_f"]
    assert "ties" in r or "tied" in r
    assert "lm_head" in r and "transformer.wte" in r
    _check_equal(model, folded, ids)


def test_refused_linear_also_called_on_another_input():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)
            with torch.no_grad():
                self.ln.weight.uniform_(0.5, 1.5)

        def forward(self, x, **kwargs):
            if x.shape[1] > 100:
                raise ValueError
            return self.fc(self.ln(x)) + self.fc(x)

    model, x = M().eval(), torch.randn(2, 3, 8)
    folded, rep = fold(model, x)
    r = _skipped(rep)["ln"]
    assert "also called on another input" in r
    assert float((_run(model, x) - _run(folded, x)).abs().max()) == 0


def test_refused_custom_norm_not_proven_rms():
    model, ids = H.LlamaLikeModel(gemma_norm=True), H.example_ids()
    folded, rep = fold(model, ids)
    assert not rep.folded
    r = _skipped(rep)["layers.0.input_layernorm"]
    assert "custom norm GemmaLikeRMSNorm" in r and "not x * rsqrt" in r
    _check_equal(model, folded, ids)


def test_refused_training_mode():
    model = H.GPT2LikeModel().train()
    _, rep = fold(model, H.example_ids())
    assert not rep.folded
    assert "training mode" in _skipped(rep)["h.0.ln_1"]


# --------------------------------------------------------------------------- real transformers (optional)


def _tiny(transformers, name):
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=32)
        return transformers.BertModel(cfg, add_pooling_layer=False)
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      use_cache=False)
        return transformers.GPT2Model(cfg)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, intermediate_size=48, max_position_embeddings=32,
                                   use_cache=False)
    return transformers.LlamaModel(cfg)


def _perturb(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name.lower() or "ln" in name):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("name,expect", [
    ("bert", set()),
    ("gpt2", {"h.0.ln_1", "h.0.ln_2", "h.1.ln_1", "h.1.ln_2"}),
    ("llama", {"layers.0.input_layernorm", "layers.0.post_attention_layernorm",
               "layers.1.input_layernorm", "layers.1.post_attention_layernorm"}),
])
def test_real_transformers(name, expect):
    transformers = pytest.importorskip("transformers")
    model = _perturb(_tiny(transformers, name))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    folded, rep = fold(model, ids)
    assert set(_folded(rep)) == expect, rep.skipped
    if name == "bert":
        assert "residual" in _skipped(rep)["embeddings.LayerNorm"] or "not a Linear" in _skipped(rep)[
            "embeddings.LayerNorm"]
    ref, out = _run(model, ids), _run(folded, ids)
    assert _max_rel_diff(ref.last_hidden_state, out.last_hidden_state) <= 1e-5


# --------------------------------------------------------------------------- graph boundaries, export failures


class _UntraceableAttention(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h, **kwargs):
        if h.shape[1] > 100:
            raise ValueError
        return (self.q(h) @ self.k(h).transpose(-1, -2)).softmax(-1) @ self.v(h)


def test_norm_in_traced_root_feeding_an_untraceable_block():
    """The root traces (the attention is an untraceable leaf): FX sees the LayerNorm feed the
    leaf; the export graph proves it feeds exactly q/k/v inside it."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.attn = nn.LayerNorm(8), _UntraceableAttention()
            with torch.no_grad():
                self.ln.weight.uniform_(0.5, 1.5)
                self.ln.bias.uniform_(-1, 1)

        def forward(self, x):
            return x + self.attn(self.ln(x))

    model, x = M().eval(), torch.randn(2, 5, 8)
    _, rep = fold(model)
    assert "not a Linear" in _skipped(rep)["ln"]
    folded, rep = fold(model, x)
    assert _folded(rep)["ln"]["into"] == "attn.q, attn.k, attn.v"
    assert _max_rel_diff(_run(model, x), _run(folded, x)) <= 1e-5


def test_norm_called_twice_folds_when_every_call_feeds_linears_only():
    class M(nn.Module):
        def __init__(self, residual=False):
            super().__init__()
            self.residual = residual
            self.ln, self.a, self.b = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8)
            with torch.no_grad():
                self.ln.weight.uniform_(0.5, 1.5)
                self.ln.bias.uniform_(-1, 1)

        def forward(self, x, **kwargs):
            if x.shape[1] > 100:
                raise ValueError
            h = self.a(self.ln(x))
            y = self.ln(h)
            return self.b(y) + (y if self.residual else 0)

    x = torch.randn(2, 5, 8)
    model = M().eval()
    folded, rep = fold(model, x)
    assert _folded(rep)["ln"]["into"] == "a, b"
    assert _max_rel_diff(_run(model, x), _run(folded, x)) <= 1e-5
    _, rep = fold(M(residual=True).eval(), x)
    assert "residual" in _skipped(rep)["ln"]


def test_export_failure_is_reported():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 3)
            with torch.no_grad():
                self.ln.weight.uniform_(0.5, 1.5)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: neither FX nor torch.export can trace it
                return self.fc(self.ln(x))
            return self.fc(self.ln(-x))

    x = torch.ones(2, 3, 8)
    folded, rep = fold(M().eval(), x)
    r = _skipped(rep)["ln"]
    assert "inside untraceable region" in r and "torch.export on the example inputs failed too" in r
