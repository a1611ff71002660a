"""One test per fold rule and per skip reason (normswap/fold/rules/*)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normswap.fold import fold, plan
from normswap.views.fx import build_view
from normswap.fold.rules import RULES, bn_next, conv_bn, convtranspose_bn, functional_bn, linear_bn, norm_affine_linear
from normswap.graph import trace_regions

torch.manual_seed(0)


def rand_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase,)) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            for n in ("weight", "bias"):
                p = getattr(m, n, None)
                if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) \
                        and isinstance(p, torch.Tensor):
                    p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def check_equal(model, x, **kw):
    with torch.no_grad():
        y = model(*x) if isinstance(x, tuple) else model(x)
    f, rep = fold(model, x, **kw)
    with torch.no_grad():
        yf = f(*x) if isinstance(x, tuple) else f(x)
    assert (yf - y).abs().max() <= 1e-5 * (1 + y.abs().max()), rep.to_dict()
    return f, rep


def reasons(rep):
    return {s["norm"]: s["reason"] for s in rep.skipped}


def only_reason(rep, name):
    r = reasons(rep)
    assert name in r, rep.to_dict()
    return r[name]


def test_rules_list():
    assert [r.NAME for r in RULES] == ["conv_bn", "convtranspose_bn", "linear_bn", "traced_conv_bn", "bn_next",
                                       "norm_affine_linear", "composite_bn", "functional_bn"]
    for r in RULES:
        assert callable(r.check) and callable(r.apply) and callable(r.applies)


def _site(model, name):
    view = build_view(model, trace_regions(model))
    return next(s for s in view.sites() if s.name == name), view


# --------------------------------------------------------------------------- conv_bn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn1(self.conv1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(Block())

    def forward(self, x):
        return self.layer1(x)


def test_conv_bn_keeps_classes_and_names_and_input_untouched():
    m = rand_stats(Net())
    w0 = m.layer1[0].conv1.weight.clone()
    f, rep = check_equal(m, torch.randn(2, 3, 5, 5))
    assert type(f) is Net and type(f.layer1[0]) is Block
    assert isinstance(f.layer1[0].bn1, nn.Identity)
    assert f.layer1[0].conv1.bias is not None  # created
    assert isinstance(m.layer1[0].bn1, nn.BatchNorm2d) and torch.equal(m.layer1[0].conv1.weight, w0)
    assert rep.to_dict()["folded"][0] == {"norm": "layer1.0.bn1", "kind": "bn", "into": "layer1.0.conv1",
                                          "pattern": "conv_bn"}
    site, ctx = _site(rand_stats(Net()), "layer1.0.bn1")
    assert conv_bn.rule.check(site, ctx) is None


def test_inplace_modifies_input():
    m = rand_stats(Net())
    f, rep = fold(m, inplace=True)
    assert f is m and isinstance(m.layer1[0].bn1, nn.Identity)


def test_conv_bn_skip_more_than_one_consumer():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    _, rep = check_equal(rand_stats(M()), torch.randn(1, 3, 4, 4))
    assert "used by more than one consumer" in only_reason(rep, "bn")
    site, ctx = _site(rand_stats(M()), "bn")
    assert "more than one consumer" in conv_bn.rule.check(site, ctx)


class TwoCalls(nn.Module):
    def __init__(self, consistent):
        super().__init__()
        self.consistent = consistent
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv(x)))
        return self.bn1(self.conv(x)) if self.consistent else self.bn2(self.conv(x))


def test_conv_called_twice_with_different_bns_is_refused():
    _, rep = check_equal(rand_stats(TwoCalls(False)), torch.randn(1, 3, 4, 4))
    assert not rep.folded
    assert "called at several places whose call sites differ" in only_reason(rep, "bn1")
    assert "called at several places whose call sites differ" in only_reason(rep, "bn2")


def test_conv_bn_pair_called_twice_is_folded_once():
    m = rand_stats(TwoCalls(True))
    w = m.conv.weight.detach().clone()
    f, rep = check_equal(m, torch.randn(1, 3, 4, 4))
    assert [d["norm"] for d in rep.folded] == ["bn1"]
    s = m.bn1.weight / torch.sqrt(m.bn1.running_var + m.bn1.eps)
    assert torch.allclose(f.conv.weight, w * s[:, None, None, None], atol=1e-6)  # scaled once


def test_skip_track_running_stats_false():
    m = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    _, rep = check_equal(m, torch.randn(2, 3, 4, 4))
    assert "track_running_stats=False" in only_reason(rep, "1")


def test_training_mode_refused_and_eval_switches():
    m = rand_stats(Net()).train()
    f, rep = fold(m)
    assert "training mode" in only_reason(rep, "layer1.0.bn1") and not rep.folded
    assert all(d.reason and "training mode" in d.reason for d in plan(m))
    f, rep = fold(m, eval=True)
    assert rep.switched_to_eval and rep.folded and any("eval" in n for n in rep.notes)
    assert m.training  # the input model is not switched
    assert not f.training


def test_norm_in_training_mode_refused():
    m = rand_stats(Net())
    m.layer1[0].bn1.train()
    _, rep = fold(m)
    assert "the norm is in training mode" in only_reason(rep, "layer1.0.bn1")


def test_tied_weights_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1)
            self.b = nn.Conv2d(3, 3, 1)
            self.b.weight = self.a.weight
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.a(x)) + self.b(x)

    _, rep = check_equal(rand_stats(M()), torch.randn(1, 3, 4, 4))
    assert "shares (ties) its parameters with 'b'" in only_reason(rep, "bn")


def test_parametrized_producer_refused_then_baked():
    m = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4))
    rand_stats(m)
    x = torch.randn(2, 3, 5, 5)
    _, rep = check_equal(m, x)
    r = only_reason(rep, "1")
    assert "reparametrised weight (spectral)" in r and "bake" in r
    assert "bake_spectral_norm" in only_reason(rep, "0.weight")
    f, rep = check_equal(m, x, bake_spectral_norm=True)
    assert {d["pattern"] for d in rep.folded} == {"conv_bn", "bake_spectral_norm"}
    assert rep.baked[0]["api"] == "parametrization" and type(f[0]) is nn.Conv2d
    # consistent with plan
    d = {p.norm: p for p in plan(m, bake_spectral_norm=True)}
    assert d["1"].reason is None and d["0.weight"].reason is None
    # the input model still has (and runs) its parametrization: baking a copy must not touch
    # the class it shares with the copy
    assert m[0].parametrizations is not None and m(x).shape == f(x).shape


def test_legacy_spectral_norm_baked():
    m = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4), nn.ReLU())
    rand_stats(m)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        m(x)
    u = m[0].weight_u.clone()
    f, rep = check_equal(m, x, bake_spectral_norm=True)
    assert rep.baked[0]["api"] == "hook" and len(rep.folded) == 2
    assert torch.equal(m[0].weight_u, u)  # no power-iteration step on the input model
    assert not hasattr(f[0], "weight_orig")


def test_hooked_producer_refused():
    m = rand_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    m[0].register_forward_hook(lambda mod, i, o: o * 2)
    _, rep = check_equal(m, torch.randn(1, 3, 5, 5))
    assert "hooks" in only_reason(rep, "1")


def test_quantized_producer_refused():
    import torch.ao.nn.qat as nnqat
    from torch.ao.quantization import get_default_qat_qconfig

    qconv = nnqat.Conv2d(3, 4, 3, qconfig=get_default_qat_qconfig("fbgemm"))
    m = rand_stats(nn.Sequential(qconv, nn.BatchNorm2d(4)))
    _, rep = fold(m)
    assert "quantized" in only_reason(rep, "1")


def test_unsupported_subclass_refused():
    class BNAct(nn.BatchNorm2d):
        def forward(self, x):
            return F.relu(super().forward(x))

    m = rand_stats(nn.Sequential(nn.Conv2d(3, 4, 3), BNAct(4)))
    _, rep = check_equal(m, torch.randn(1, 3, 5, 5))
    assert "unsupported subclass BNAct of BatchNorm2d" in only_reason(rep, "1")


def test_conv_subclass_is_folded_only_through_its_traced_forward():
    # FX traces into a user subclass: the fold is proven on its own F.conv2d call (issue 11);
    # a subclass whose traced forward uses its weights otherwise is refused (tests/test_fold_library.py)
    class MyConv(nn.Conv2d):
        pass

    m = rand_stats(nn.Sequential(MyConv(3, 4, 3), nn.BatchNorm2d(4)))
    _, rep = check_equal(m, torch.randn(1, 3, 5, 5))
    assert [d["pattern"] for d in rep.folded] == ["traced_conv_bn"]


def test_nan_stats_refused():
    m = rand_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    m[1].running_var[0] = float("inf")
    _, rep = fold(m)
    assert "non-finite statistics" in only_reason(rep, "1")


def test_untraceable_region_refused():
    class DD(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            if x.sum() > 0:
                return self.bn(self.conv(x))
            return x

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.dd = DD()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(self.dd(x)))

    _, rep = check_equal(rand_stats(M()), torch.randn(1, 3, 4, 4).abs())
    assert "inside untraceable region 'dd'" in only_reason(rep, "dd.bn")
    assert [d["norm"] for d in rep.folded] == ["bn"]


def test_norm_with_hook_refused():
    m = rand_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    m[1].register_forward_pre_hook(lambda mod, i: None)
    _, rep = fold(m)
    assert "the norm has hooks" in only_reason(rep, "1")


def test_frozen_bn_folded():
    from samples.models import FrozenBatchNorm2d

    fb = FrozenBatchNorm2d(4)
    fb.running_mean.normal_()
    fb.running_var.uniform_(0.5, 2)
    fb.weight.normal_()
    m = nn.Sequential(nn.Conv2d(3, 4, 3), fb).eval()
    _, rep = check_equal(m, torch.randn(1, 3, 5, 5))
    assert rep.folded[0]["kind"] == "frozen_bn"


def test_half_precision_model_folded_in_float64():
    m = rand_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    m[1].running_var.fill_(1e-8)
    m = m.to(torch.bfloat16)
    f, rep = fold(m)
    assert f[0].weight.dtype == torch.bfloat16 and rep.folded


# --------------------------------------------------------------------------- convtranspose_bn


def test_convtranspose_groups_folded():
    m = rand_stats(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, output_padding=1),
                                 nn.BatchNorm2d(6)))
    _, rep = check_equal(m, torch.randn(2, 4, 3, 3))
    assert rep.folded[0]["pattern"] == "convtranspose_bn"


def test_convtranspose_skip_channel_mismatch_via_check():
    m = rand_stats(nn.Sequential(nn.ConvTranspose2d(4, 6, 3), nn.BatchNorm2d(6)))
    site, ctx = _site(m, "1")
    assert convtranspose_bn.rule.check(site, ctx) is None
    m[0].register_forward_pre_hook(lambda *a: None)
    site, ctx = _site(m, "1")
    assert "hooks" in convtranspose_bn.rule.check(site, ctx)


# --------------------------------------------------------------------------- linear_bn


def test_linear_bn1d_rank_unknown_then_known():
    m = rand_stats(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)))
    _, rep = fold(m)
    assert only_reason(rep, "1").startswith("input rank unknown: pass example inputs")
    _, rep = check_equal(m, torch.randn(3, 5))
    assert rep.folded[0]["pattern"] == "linear_bn"
    assert plan(m, example_inputs=(torch.randn(3, 5),))[0].reason is None


def test_linear_bn1d_on_NLC_refused_even_when_L_equals_C():
    m = rand_stats(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))  # L == C == 4
    _, rep = check_equal(m, torch.randn(2, 4, 4))
    assert "normalises dim 1" in only_reason(rep, "1")
    site, ctx = _site(m, "1")
    assert linear_bn.rule.check(site, ctx) == linear_bn.RANK_UNKNOWN


def test_linear_bn1d_shapes_prove_not_the_feature_axis():
    m = rand_stats(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(3)))  # (N, 3, 6) input only
    _, rep = fold(m)
    assert "normalises dim 1" in only_reason(rep, "1")


def test_linear_bn1d_one_channel_is_a_scalar_affine():
    m = rand_stats(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(1)))
    _, rep = check_equal(m, torch.randn(2, 1, 4))
    assert rep.folded and rep.folded[0]["pattern"] == "linear_bn"


# --------------------------------------------------------------------------- bn_next


def test_bn_next_into_conv_without_padding_and_linear():
    m = rand_stats(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")))
    _, rep = check_equal(m, torch.randn(2, 3, 5, 5))
    assert rep.folded[0]["pattern"] == "bn_next"
    m = rand_stats(nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)))
    _, rep = check_equal(m, torch.randn(4, 3))
    assert rep.folded[0] == {"norm": "0", "kind": "bn", "into": "1", "pattern": "bn_next"}


def test_bn_next_skip_zero_padding():
    m = rand_stats(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)))
    _, rep = check_equal(m, torch.randn(2, 3, 5, 5))
    r = only_reason(rep, "0")
    assert "zero padding" in r and "nothing foldable before it" in r
    site, ctx = _site(m, "0")
    assert "zero padding" in bn_next.rule.check(site, ctx)


def test_bn_next_skip_several_consumers():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.a = nn.Conv2d(3, 3, 1)
            self.b = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.bn(x)
            return self.a(y) + self.b(y)

    _, rep = check_equal(rand_stats(M()), torch.randn(1, 3, 4, 4))
    assert "feeds several layers" in only_reason(rep, "bn")


def test_bn_next_skip_convtranspose():
    m = rand_stats(nn.Sequential(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 3)))
    _, rep = check_equal(m, torch.randn(1, 3, 4, 4))
    assert "ConvTranspose" in only_reason(rep, "0")


def test_bn_next_linear_rank():
    m = rand_stats(nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)))
    _, rep = fold(m)
    assert "input rank unknown" in only_reason(rep, "0")
    _, rep = check_equal(m, torch.randn(2, 3, 3))  # (N, C, L) with L == C
    assert "not the input feature axis" in only_reason(rep, "0")


# --------------------------------------------------------------------------- norm_affine_linear


class Attn(nn.Module):
    def __init__(self, d=6, norm="ln", residual_uses_norm=False):
        super().__init__()
        self.norm = {"ln": lambda: nn.LayerNorm(d), "rms": lambda: nn.RMSNorm(d)}[norm]()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.residual_uses_norm = residual_uses_norm

    def forward(self, x):
        h = self.norm(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), -1) @ self.v(h)
        return a + (h if self.residual_uses_norm else x)


@pytest.mark.parametrize("norm", ["ln", "rms"])
def test_norm_affine_into_all_linear_consumers(norm):
    m = rand_stats(Attn(norm=norm))
    f, rep = check_equal(m, torch.randn(2, 5, 6))
    assert rep.folded[0]["into"] == "q, k, v" and rep.folded[0]["pattern"] == "norm_affine_linear"
    assert type(f.norm) is type(m.norm)
    assert torch.equal(f.norm.weight, torch.ones(6))
    assert f.k.bias is not None


def test_norm_affine_skip_non_linear_consumer():
    _, rep = check_equal(rand_stats(Attn(residual_uses_norm=True)), torch.randn(2, 5, 6))
    assert "not a Linear/conv" in only_reason(rep, "norm")


def test_norm_affine_skip_no_affine_and_identity():
    m = Attn()
    m.norm = nn.LayerNorm(6, elementwise_affine=False)
    _, rep = fold(m.eval())
    assert "no affine to fold" in only_reason(rep, "norm")
    _, rep = fold(Attn().eval())
    assert "already the identity" in only_reason(rep, "norm")


def test_norm_affine_skip_multi_dim_layernorm():
    m = rand_stats(nn.Sequential(nn.LayerNorm((3, 4)), nn.Linear(4, 2)))
    _, rep = check_equal(m, torch.randn(2, 3, 4))
    assert "spans several dims" in only_reason(rep, "0")


def test_groupnorm_affine_into_1x1_conv_and_skip_padded():
    m = rand_stats(nn.Sequential(nn.GroupNorm(2, 4), nn.Conv2d(4, 3, 1)))
    _, rep = check_equal(m, torch.randn(2, 4, 5, 5))
    assert rep.folded[0]["pattern"] == "norm_affine_linear"
    m = rand_stats(nn.Sequential(nn.GroupNorm(2, 4), nn.Conv2d(4, 3, 3, padding=1)))
    _, rep = check_equal(m, torch.randn(2, 4, 5, 5))
    assert "zero padding" in only_reason(rep, "0")
    site, ctx = _site(m, "0")
    assert "zero padding" in norm_affine_linear.rule.check(site, ctx)


def test_layernorm_into_conv_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(4)
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.ln(x))

    _, rep = check_equal(rand_stats(M()), torch.randn(1, 3, 4, 4))
    assert "over the last dim" in only_reason(rep, "ln")


# --------------------------------------------------------------------------- functional_bn


class FBN(nn.Module):
    def __init__(self, training_flag=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("rm", torch.randn(4))
        self.register_buffer("rv", torch.rand(4) + 0.5)
        self.w = nn.Parameter(torch.randn(4))
        self.flag = training_flag

    def forward(self, x):
        return F.relu(F.batch_norm(self.conv(x), self.rm, self.rv, self.w, None, training=self.flag, eps=1e-3))


def test_functional_bn_rewritten_into_graph_module():
    f, rep = check_equal(FBN().eval(), torch.randn(2, 3, 5, 5))
    assert isinstance(f, torch.fx.GraphModule) and rep.returns_graph_module
    assert rep.graph_rewritten == [""] and rep.folded[0]["pattern"] == "functional_bn"
    assert "batch_norm" not in f.code


def test_functional_bn_in_submodule_keeps_root_class():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = FBN()
            self.bn = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            if x.sum() > -1e9:  # the root is untraceable: `inner` is a region of its own
                return self.bn(self.conv(self.inner(x)))
            return x

    m = rand_stats(Outer())
    f, rep = check_equal(m, torch.randn(2, 3, 5, 5))
    assert type(f) is Outer and isinstance(f.inner, torch.fx.GraphModule)
    assert rep.graph_rewritten == ["inner"] and not rep.returns_graph_module


def test_functional_bn_skip_training_true():
    m = FBN(training_flag=True).eval()
    _, rep = fold(m)
    r = [s for s in rep.skipped if s["kind"] == "functional_bn"][0]["reason"]
    assert "training=True" in r


def test_functional_bn_skip_non_constant_stats():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return F.batch_norm(y, y.mean((0, 2, 3)), torch.ones(4), training=False)

    _, rep = fold(M().eval())
    r = [s for s in rep.skipped if s["kind"] == "functional_bn"][0]["reason"]
    assert "not a constant attribute" in r
    regions = trace_regions(M().eval())
    ctx = build_view(M().eval(), regions)
    site = [s for s in ctx.sites() if s.functional is not None][0]
    assert "constant" in functional_bn.rule.check(site, ctx)


# --------------------------------------------------------------------------- more skip reasons


def test_norm_called_after_different_producers_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1)
            self.b = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.a(x)) + self.bn(self.b(x))

    _, rep = check_equal(rand_stats(M()), torch.randn(1, 3, 4, 4))
    assert "called at several places with different producers" in only_reason(rep, "bn")


def test_norm_never_called_reported():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.unused = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(x)

    _, rep = fold(M().eval())
    assert only_reason(rep, "unused") == "not called in the traced graph"


def test_weight_norm_producer_refused():
    m = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4))
    _, rep = check_equal(rand_stats(m), torch.randn(1, 3, 5, 5), bake_spectral_norm=True)
    assert "reparametrised weight (weight_norm)" in only_reason(rep, "1")
    assert "not baked" in only_reason(rep, "0.weight")


def test_non_parameter_weight_refused():
    conv = nn.Conv2d(3, 4, 1)
    w = conv.weight.detach().clone()
    del conv.weight
    conv.register_buffer("weight", w)
    m = rand_stats(nn.Sequential(conv, nn.BatchNorm2d(4)))
    _, rep = check_equal(m, torch.randn(1, 3, 4, 4))
    assert "not plain parameters" in only_reason(rep, "1")


def test_consumer_called_elsewhere_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(self.bn(x)) + self.fc(x)

    _, rep = check_equal(rand_stats(M()), torch.randn(4, 3))
    assert "'fc' is called at several places whose call sites differ" in only_reason(rep, "bn")


def test_unbatched_conv_input_refused():
    m = rand_stats(nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4)))  # (C, L) = (3, 4) unbatched
    _, rep = check_equal(m, torch.randn(3, 4))
    assert "unbatched" in only_reason(rep, "1")


def test_functional_bn_after_linear_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.register_buffer("rm", torch.zeros(4))
            self.register_buffer("rv", torch.ones(4))

        def forward(self, x):
            return F.batch_norm(self.fc(x), self.rm, self.rv, training=False)

    _, rep = fold(M().eval())
    assert "after a Linear" in rep.skipped[0]["reason"]


def test_custom_norm_refused_without_inputs_and_proven_with_them():
    from samples.models import ALL_SAMPLES

    m, x = ALL_SAMPLES["llama_block"]()
    _, rep = fold(m)  # no example inputs: its forward cannot be proven
    assert rep.skipped and all("custom norm LlamaRMSNorm" in s["reason"] for s in rep.skipped)
    y = m(*x)
    folded, rep = fold(m, x)  # proven an RMSNorm on a torch.export graph (issue 11)
    assert {(d["norm"], d["into"]) for d in rep.folded} == {("block.norm2", "block.mlp.0"), ("norm", "head")}
    assert [s["norm"] for s in rep.skipped] == ["block.norm1"]  # feeds nn.MultiheadAttention, not a Linear
    assert "not a Linear" in rep.skipped[0]["reason"]
    assert torch.allclose(folded(*x), y, atol=1e-5)


def test_bn_output_used_twice_into_next_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            y = self.bn(x)
            return self.fc(y) + y

    _, rep = check_equal(rand_stats(M()), torch.randn(4, 3))
    assert "not a Conv/Linear" in only_reason(rep, "bn")


def test_eval_mode_result_and_plan_match_fold():
    from samples.models import ALL_SAMPLES

    m, x = ALL_SAMPLES["train_mode"]()
    decisions = plan(m, eval=True)
    _, rep = fold(m, eval=True)
    assert {d.norm for d in decisions if d.reason is None} == {f["norm"] for f in rep.folded}


def test_functional_and_module_bn_in_one_graph_module():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            self.conv = nn.Conv2d(4, 4, 1)
            self.register_buffer("rm", torch.randn(4))
            self.register_buffer("rv", torch.rand(4) + 0.5)

        def forward(self, x):
            return F.batch_norm(self.conv(F.relu(self.block(x))), self.rm, self.rv, training=False)

    m = rand_stats(M())
    f, rep = check_equal(m, torch.randn(2, 3, 6, 6))
    assert isinstance(f, torch.fx.GraphModule) and len(rep.folded) == 2
    assert isinstance(f.get_submodule("block.1"), nn.Identity) and not f.training and not f.block.training
    _, rep2 = fold(f)  # folding again: nothing left, nothing wrong
    assert not rep2.folded


# --------------------------------------------------------------------------- composite_bn


def test_composite_bn_stats_folded_conditional_affine_kept():
    from normswap.fold.rules import composite_bn
    from normswap.layers import ConditionalBatchNorm2d, SandwichBatchNorm2d

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.cbn = ConditionalBatchNorm2d(4, num_classes=3)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.sabn = SandwichBatchNorm2d(4, num_branches=2)

        def forward(self, x, y):
            return self.sabn(self.conv2(F.relu(self.cbn(self.conv(x), y))), y % 2)

    m = rand_stats(M())
    with torch.no_grad():
        m.cbn.embed.weight.normal_()
        m.sabn.embed.weight.normal_()
    x = (torch.randn(2, 3, 5, 5), torch.tensor([0, 2]))
    f, rep = check_equal(m, x)
    assert [d["pattern"] for d in rep.folded] == ["composite_bn", "composite_bn"]
    assert type(f.cbn) is ConditionalBatchNorm2d and isinstance(f.cbn.bn, nn.Identity)
    assert isinstance(f.sabn.bn, nn.Identity)
    site, ctx = _site(m, "cbn")
    assert composite_bn.rule.check(site, ctx) is None


def test_composite_bn_skip_reason():
    from normswap.layers import ConditionalBatchNorm2d

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.cbn = ConditionalBatchNorm2d(3, num_classes=2)

        def forward(self, x, y):
            return self.cbn(F.relu(x), y)

    _, rep = fold(rand_stats(M()))
    r = only_reason(rep, "cbn")
    assert "conditional affine" in r and "not a Conv/ConvTranspose" in r


# --- QA regressions: uses of a layer / norm that the traced call sites do not show ---------


def _fold_no_inputs_equal(model, x):
    """Fold without example inputs (no verification run) and compare outputs."""
    with torch.no_grad():
        y = model(x)
    f, rep = fold(model)
    with torch.no_grad():
        yf = f(x)
    assert (yf - y).abs().max() <= 1e-5 * (1 + y.abs().max()), rep.to_dict()
    return rep


def test_layer_weight_read_directly_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.c(x)) + F.conv2d(x, self.c.weight)

    rep = _fold_no_inputs_equal(rand_stats(M()), torch.randn(2, 3, 4, 4))
    assert "'c': its weight is also read directly" in only_reason(rep, "bn")


def test_norm_affine_into_linear_whose_weight_is_read_directly_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.ln(x)) + F.linear(x, self.fc.weight)

    rep = _fold_no_inputs_equal(rand_stats(M()), torch.randn(2, 4))
    assert "also read directly" in only_reason(rep, "ln")


class _Untraceable(nn.Module):
    def __init__(self, mod):
        super().__init__()
        self.mod = mod

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: FX cannot trace this forward
            return self.mod(x)
        return 2 * self.mod(x)


def test_conv_also_called_in_untraceable_region_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.u = _Untraceable(self.c)

        def forward(self, x):
            return self.bn(self.c(x)) + self.u(x)

    rep = _fold_no_inputs_equal(rand_stats(M()), torch.randn(2, 3, 4, 4) + 1)
    assert "untraceable region 'u'" in only_reason(rep, "bn")


def test_norm_also_called_in_untraceable_region_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.u = _Untraceable(self.bn)

        def forward(self, x):
            return self.bn(self.c(x)) + self.u(x)

    rep = _fold_no_inputs_equal(rand_stats(M()), torch.randn(2, 3, 4, 4) + 1)
    assert "untraceable region 'u'" in only_reason(rep, "bn")


@pytest.mark.parametrize("conv, norm, x", [
    (nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4), torch.randn(4, 4)),        # unbatched (C, L), L == C
    (nn.Conv2d(2, 5, 1), nn.BatchNorm1d(5), torch.randn(2, 5, 3)),     # unbatched (C, H, W), H == C
])
def test_unbatched_conv_without_example_inputs_refused(conv, norm, x):
    rep = _fold_no_inputs_equal(rand_stats(nn.Sequential(conv, norm)), x)
    assert "input rank unknown" in only_reason(rep, "1")


def test_batched_conv2d_bn2d_without_example_inputs_still_folds():
    rep = _fold_no_inputs_equal(rand_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))),
                                torch.randn(2, 3, 6, 6))
    assert [f["norm"] for f in rep.folded] == ["1"]


def test_bn_into_unbatched_conv_refused():
    # BatchNorm1d sees (C, L) = (4, 4) as (N, C): its dim 1 is not the conv's channel axis
    m = rand_stats(nn.Sequential(nn.BatchNorm1d(4), nn.Conv1d(4, 3, 1)))
    _, rep = check_equal(m, torch.randn(4, 4))
    assert "unbatched" in only_reason(rep, "0")


def test_norm_affine_with_tied_weight_refused():
    # QA regression: the folded norm's weight is reset to ones; a second LayerNorm holding the
    # same Parameter changed with it (silently, without example inputs)
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.LayerNorm(4)
            self.b = nn.LayerNorm(4)
            self.b.weight = self.a.weight
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.a(x)) + self.b(x)[:, :3]

    rep = _fold_no_inputs_equal(rand_stats(M()), torch.randn(2, 4))
    assert "shared (tied) with 'b'" in only_reason(rep, "a")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fold_verification_tolerance(dtype):
    # QA regression: the verification tolerance for half precision was the float32 one (the
    # dtype was read after casting to float64), so an exact fp16 fold was reported FAILED
    m = rand_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).to(dtype)
    _, rep = fold(m, torch.randn(2, 3, 8, 8).to(dtype))
    assert rep.folded and rep.verification["ok"] and rep.passed


def test_layer_called_directly_by_untraceable_ancestor_refused():
    # QA regression: the untraceable root calls a grandchild (block[0]) besides the traced block
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

        def forward(self, x):
            if x.sum() > 0:
                return self.block(x) + self.block[0](x)
            return self.block(x)

    m, x = rand_stats(M()), torch.randn(2, 3, 4, 4) + 1
    rep = _fold_no_inputs_equal(m, x)  # static: anything under an untraceable region is unproven
    assert "untraceable region '<model>'" in only_reason(rep, "block.1")
    _, rep = check_equal(m, x)  # with example inputs: the call counts show the hidden call
    assert "ran 2 times on the example inputs" in only_reason(rep, "block.1")


def test_functional_bn_after_unbatched_conv_without_inputs_refused():
    # QA regression: F.batch_norm takes dim 1 as channels at any rank; Conv1d on unbatched (C, L)
    # input with L == C was folded per conv channel (silently wrong without example inputs)
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 1)
            self.register_buffer("rm", torch.randn(4))
            self.register_buffer("rv", torch.rand(4) + 0.5)

        def forward(self, x):
            return F.batch_norm(self.conv(x), self.rm, self.rv, training=False)

    rep = _fold_no_inputs_equal(M().eval(), torch.randn(4, 4))
    assert "input rank unknown" in rep.skipped[0]["reason"]
    _, rep = check_equal(M().eval(), torch.randn(4, 4))  # with inputs: proven unbatched
    assert "unbatched" in rep.skipped[0]["reason"]
    _, rep = check_equal(M().eval(), torch.randn(2, 4, 4))  # batched: folds
    assert rep.folded and rep.folded[0]["pattern"] == "functional_bn"


# --------------------------------------------------------------------------- rounds


class _ConvBnBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn2(self.bn1(self.conv(x))))


def _random_stats(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def test_conv_bn_bn_folds_both_in_two_rounds():
    model = _random_stats(_ConvBnBn())
    x = torch.randn(2, 3, 8, 8)
    decisions = {d.norm: d for d in plan(model)}
    assert decisions["bn1"].reason is None and decisions["bn1"].pattern == "conv_bn"
    assert decisions["bn2"].reason is None and decisions["bn2"].pattern == "conv_bn"
    assert decisions["bn2"].into == "conv"
    folded, report = fold(model, (x,))
    assert [f["norm"] for f in report.folded] == ["bn1", "bn2"]
    assert all(f["into"] == "conv" for f in report.folded)
    assert report.skipped == []
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    assert report.verification["ok"]
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_bn_bn_conv_folds_both_into_the_next_conv():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(3)
            self.bn2 = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(self.bn2(self.bn1(x)))

    model = _random_stats(M())
    for bn in (model.bn1, model.bn2):
        with torch.no_grad():
            bn.running_mean.normal_()
    x = torch.randn(2, 3, 5, 5)
    folded, report = fold(model, (x,))
    assert sorted(f["norm"] for f in report.folded) == ["bn1", "bn2"]
    assert all(f["pattern"] == "bn_next" for f in report.folded)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert all(d.reason is None for d in plan(model, example_inputs=(x,)))


def test_second_round_keeps_refusals_of_the_first():
    # conv -> bn1 -> bn2 with the conv's output also used elsewhere: nothing folds into the conv
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return F.relu(self.bn2(self.bn1(y))) + y

    model = _random_stats(M())
    folded, report = fold(model, (torch.randn(1, 3, 6, 6),))
    assert report.folded == []
    assert {s["norm"] for s in report.skipped} == {"bn1", "bn2"}


def test_rules_are_objects_with_one_check():
    from normswap.fold.rules import FoldRule, ProducerRule

    producers = [r for r in RULES if isinstance(r, ProducerRule)]
    assert [r.NAME for r in producers] == ["conv_bn", "convtranspose_bn", "linear_bn"]
    assert len({type(r) for r in producers}) == 1  # one class, parameterised by layer types
    for r in RULES:
        assert isinstance(r, FoldRule)
        assert type(r).check is FoldRule.check  # check() is written once, in the base class
