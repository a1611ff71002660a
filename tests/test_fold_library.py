"""Fold on the structures of real model libraries (issue 11), using the faithful rebuilds in
samples/timm_like.py: timm's BatchNormAct2d folds its BN part and keeps drop/act; each new
pattern has its refusal cases, one test per reason."""

import copy

import pytest
import torch
from torch import nn

import samples.timm_like as T
from normswap.fold import fold, plan
from normswap.norms import classify


def _reasons(report):
    return {d["norm"]: d["reason"] for d in report.skipped}


def test_batchnormact_network_folds_every_bn_and_keeps_its_activations():
    m, x = T.timm_bnact_net()
    y = m(*x)
    folded, rep = fold(m, x)
    assert [d["norm"] for d in rep.folded] == ["1", "3", "5"] and not rep.skipped
    assert torch.allclose(folded(*x), y, atol=1e-5, rtol=1e-5)
    assert type(folded[1]).__name__ == "PostOps" and isinstance(folded[1].act, nn.ReLU)
    assert isinstance(folded[3].drop, nn.Dropout) and isinstance(folded[3].act, nn.SiLU)
    assert isinstance(folded[5], nn.Identity)  # apply_act=False: nothing to keep
    assert not any(classify(mm) for mm in folded.modules())


def test_batchnormact_plan_matches_fold():
    m, x = T.timm_bnact_net()
    decisions = plan(m, example_inputs=x)
    assert all(d.reason is None for d in decisions)
    assert {d.norm: d.into for d in decisions} == {"1": "0", "3": "2", "5": "4"}


def test_refused_when_the_activation_comes_before_the_norm():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), T.BatchNormAct2d(4), nn.Flatten()).eval()
    x = torch.randn(2, 3, 6, 6)
    _, rep = fold(m, (x,))
    r = _reasons(rep)["2"]
    assert "ReLU" in r


def test_batchnormact_never_folds_into_the_layer_after_it():
    # nothing foldable before it; its own activation sits between it and the next conv
    m = nn.Sequential(T.BatchNormAct2d(3), nn.Conv2d(3, 4, 1)).eval()
    T._randomize(m)
    x = torch.randn(2, 3, 5, 5)
    y = m(x)
    folded, rep = fold(m, (x,))
    assert "follows the normalisation" in _reasons(rep)["0"]
    assert torch.equal(folded(x), y)


def test_batchnormact_without_activation_may_fold_into_the_next_layer():
    m = nn.Sequential(T.BatchNormAct2d(3, apply_act=False), nn.Conv2d(3, 4, 1)).eval()
    T._randomize(m)
    x = torch.randn(2, 3, 5, 5)
    y = m(x)
    folded, rep = fold(m, (x,))
    assert [d["pattern"] for d in rep.folded] == ["bn_next"]
    assert torch.allclose(folded(x), y, atol=1e-5)


def test_batchnormact_in_training_mode_is_refused():
    m, x = T.timm_bnact_net()
    m.train()
    _, rep = fold(m, x)
    assert rep.folded == [] and all("training mode" in d["reason"] for d in rep.skipped)


def test_a_subclass_with_more_children_stays_unsupported():
    class MoreAct(T.BatchNormAct2d):
        def __init__(self, c):
            super().__init__(c)
            self.extra = nn.Tanh()

    m = nn.Sequential(nn.Conv2d(3, 4, 3), MoreAct(4)).eval()
    assert classify(m[1]) == "unsupported_subclass"
    _, rep = fold(m, (torch.randn(1, 3, 5, 5),))
    assert "unsupported subclass" in _reasons(rep)["1"]


def test_batchnormact_state_dict_round_trip_through_the_recipe(tmp_path):
    from normswap.fold.pipeline import fold_file
    from normswap.io import load_model

    m, x = T.timm_bnact_net()
    torch.save(m.state_dict(), tmp_path / "m.pt")
    rep = fold_file(str(tmp_path / "m.pt"), arch="samples.timm_like:timm_bnact_model",
                    input_shape="2,3,8,8", output=str(tmp_path / "f.pt"))
    assert len(rep.folded) == 3
    back = load_model(str(tmp_path / "f.pt"), arch="samples.timm_like:timm_bnact_model").module
    assert type(back[1]).__name__ == "PostOps"
    assert torch.allclose(back(*x), m(*x), atol=1e-5)


# --------------------------------------------------------------------------- convs with their own forward

import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402


def test_conv2dsame_networks_fold_every_bn():
    m, x = T.conv2dsame_net()
    y = m(*x)
    folded, rep = fold(m, x)
    assert {d["norm"]: d["pattern"] for d in rep.folded} == {"1": "conv_bn", "4": "traced_conv_bn"}
    assert not rep.skipped
    assert torch.allclose(folded(*x), y, atol=1e-5, rtol=1e-5)


class _OwnForward(nn.Conv2d):
    """A conv subclass FX traces into (pad module, then F.conv2d of its own weights)."""

    def __init__(self, *a, pad=1, **k):
        super().__init__(*a, **k)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c):
    bn = nn.BatchNorm2d(c)
    T._randomize(bn)
    return bn


class _TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _OwnForward(3, 4, 3)
        self.bn = _bn(4)

    def forward(self, x):
        c = self.conv(x)
        return self.bn(c) + c


class _ReadElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _OwnForward(3, 4, 3)
        self.bn = _bn(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.conv.weight.mean()


class _ForeignBias(_OwnForward):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.other_bias = nn.Parameter(torch.randn(self.out_channels))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.other_bias, self.stride, 0, self.dilation, self.groups)


class _IgnoresBias(_OwnForward):
    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, None, self.stride, 0, self.dilation, self.groups)


def _refusal(model, x):
    model.eval()
    y = model(x)
    folded, rep = fold(model, (x,))
    assert torch.equal(folded(x), y)  # nothing changed
    return " | ".join(d["reason"] for d in rep.skipped)


def test_traced_conv_refused_when_its_output_has_two_users():
    assert "more than one consumer" in _refusal(_TwoUsers(), torch.randn(2, 3, 6, 6))


def test_traced_conv_refused_when_its_weight_is_read_elsewhere():
    r = _refusal(_ReadElsewhere(), torch.randn(2, 3, 6, 6))
    assert "used by more than the convolution call" in r


def test_traced_conv_refused_when_it_uses_a_foreign_bias():
    m = nn.Sequential(_ForeignBias(3, 4, 3), _bn(4))
    assert "does not use its own bias" in _refusal(m, torch.randn(2, 3, 6, 6))


def test_traced_conv_refused_when_the_call_ignores_its_bias():
    m = nn.Sequential(_IgnoresBias(3, 4, 3), _bn(4))
    assert "ignores its bias" in _refusal(m, torch.randn(2, 3, 6, 6))


def test_traced_conv_refused_when_weights_are_tied():
    a, b = _OwnForward(4, 4, 3), _OwnForward(4, 4, 3)
    b.weight = a.weight
    m = nn.Sequential(a, _bn(4), b, _bn(4))
    assert "ties" in _refusal(m, torch.randn(2, 4, 6, 6))


@settings(max_examples=25, deadline=None)
@given(k=st.sampled_from([1, 2, 3]), stride=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2, 4]),
       bias=st.booleans(), pad=st.integers(0, 2), same=st.booleans(), seed=st.integers(0, 10_000))
def test_traced_and_same_padding_convs_fold_exactly(k, stride, groups, bias, pad, same, seed):
    torch.manual_seed(seed)
    conv = (T.Conv2dSame(4, 8, k, stride=stride, groups=groups, bias=bias) if same
            else _OwnForward(4, 8, k, stride=stride, groups=groups, bias=bias, pad=pad))
    m = nn.Sequential(conv, _bn(8), nn.ReLU()).eval()
    T._randomize(m[1], seed)
    x = torch.randn(2, 4, 7, 7)
    ref = m.double()(x.double())
    m.float()
    folded, rep = fold(m, (x,))
    assert len(rep.folded) == 1 and not rep.skipped
    assert (folded(x).double() - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())


# --------------------------------------------------------------------------- weight standardization, FRN+act, EvoNorm

def test_weight_standardization_is_audited_on_the_conv_weight_not_as_a_train_mode_bn():
    from normswap.audit import audit

    m, x = T.stdconv_net()
    rep = audit(m, x)
    assert {(s.name, s.kind) for s in rep.sites} == {("0.weight", "weight_std"), ("2.weight", "weight_std")}
    assert all("--bake-weight-std" in s.reason for s in rep.sites)


@pytest.mark.parametrize("cls", [T.StdConv2d, T.ScaledStdConv2d])
def test_weight_standardization_bakes_exactly_and_then_the_bn_folds(cls):
    torch.manual_seed(0)
    conv = cls(3, 8, 3)
    if hasattr(conv, "gain"):
        with torch.no_grad():
            conv.gain.uniform_(0.5, 1.5)
    m = nn.Sequential(conv, _bn(8), nn.ReLU()).eval()
    x = torch.randn(2, 3, 6, 6)
    ref = m.double()(x.double())
    m.float()
    _, rep = fold(m, (x,))
    assert rep.folded == [] and "bake_weight_std" in " ".join(d["reason"] for d in rep.skipped)
    folded, rep = fold(m, (x,), bake_weight_std=True)
    assert {d["pattern"] for d in rep.folded} == {"conv_bn", "bake_weight_std"}
    assert type(folded[0]) is nn.Conv2d
    assert (folded(x).double() - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())


def test_weight_standardization_with_dynamic_same_padding_is_not_baked():
    class StdConv2dSame(T.StdConv2d):
        pass

    m = nn.Sequential(StdConv2dSame(3, 4, 3)).eval()
    _, rep = fold(m, (torch.randn(1, 3, 5, 5),), bake_weight_std=True)
    assert "'same' padding" in rep.skipped[0]["reason"]


def test_frn_act_and_evonorm_are_audited_and_explained():
    from normswap.audit import audit

    for factory, kind in ((T.frn_act_net, "frn_act"), (T.evonorm_net, "evonorm")):
        m, x = factory()
        rep = audit(m, x)
        assert [s.kind for s in rep.sites] == [kind, kind]
        assert all(not s.foldable and "not a fixed affine" in s.reason for s in rep.sites)


def test_a_class_merely_named_conv2dsame_is_caught_by_the_probe():
    class Conv2dSame(nn.Conv2d):  # the name of timm's class, another forward
        def forward(self, x):
            return F.conv2d(x, self.weight.flip(0), self.bias, self.stride, 1, self.dilation, self.groups)

    torch.manual_seed(0)
    m = nn.Sequential(Conv2dSame(3, 4, 3), _bn(4)).eval()
    # FX traces into it: refused by the traced rule (the weight is flipped, not read directly)
    r = _refusal(m, torch.randn(2, 3, 6, 6))
    assert "does not read a module's weight directly" in r or "not an affine" in r
    from normswap.library_norms import probe_output_channel_affine

    assert "not an affine" in probe_output_channel_affine(m[0])
    assert probe_output_channel_affine(T.Conv2dSame(3, 4, 3, stride=2)) is None


# --------------------------------------------------------------------------- LayerNorm2d

def test_layernorm2d_affine_folds_into_the_following_conv():
    m, x = T.convnext_block()
    y = m(*x)
    folded, rep = fold(m, x)
    assert [(d["norm"], d["into"]) for d in rep.folded] == [("norm", "pw")]
    assert "not a Linear/conv" in _reasons(rep)["head_norm"]  # feeds a mean, not a layer
    assert torch.allclose(folded(*x), y, atol=1e-5, rtol=1e-5)
    assert type(folded.norm).__name__ == "LayerNorm2d" and bool((folded.norm.weight == 1).all())


def test_layernorm2d_affine_not_into_a_zero_padded_conv():
    m = nn.Sequential(T.LayerNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)).eval()
    T._randomize(m)
    r = _refusal(m, torch.randn(2, 4, 6, 6))
    assert "pad" in r


def test_hf_convnext_layernorm_channels_first_folds_into_a_1x1_conv():
    m = nn.Sequential(nn.Conv2d(3, 4, 2, stride=2), T.ConvNextLayerNorm(4, data_format="channels_first"),
                      nn.Conv2d(4, 6, 1)).eval()
    T._randomize(m)
    x = torch.randn(2, 3, 8, 8)
    y = m(x)
    folded, rep = fold(m, (x,))
    assert [d["norm"] for d in rep.folded] == ["1"]
    assert torch.allclose(folded(x), y, atol=1e-5)
