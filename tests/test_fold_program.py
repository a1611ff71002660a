"""fold_program: BatchNorm folding in torch.export programs (.pt2), with the eager fold's proofs."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normswap.fold.program import fold_program, plan_program
from normswap.norm_ops import op_signature
from samples.models import (ALL_SAMPLES, convtranspose_decoder, mobilenet_style, randomize_norm_stats,
                            resnet_style)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


# --------------------------------------------------------------------------- helpers


def _export(m, ex):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(m.eval() if not m.training else m, tuple(ex))


def _bn_count(ep) -> int:
    n = 0
    for node in ep.graph.nodes:
        if node.op == "call_function":
            sig = op_signature(node.target)
            n += sig is not None and sig.kind == "bn"
    return n


def _close(a, b, rel=1e-5):
    a, b = a.double(), b.double()
    return float((a - b).abs().max()) <= rel * (1 + float(a.abs().max()))


def _consistent(ep):
    """Every input spec's target is in the state (or constants); every state key is used."""
    sig = ep.graph_signature
    phs = [n.name for n in ep.graph.nodes if n.op == "placeholder"]
    assert phs == [s.arg.name for s in sig.input_specs]
    targets = {s.target for s in sig.input_specs if s.target is not None}
    for t in targets:
        assert t in ep.state_dict or t in ep.constants, t
    for k in ep.state_dict:
        assert k in targets, f"orphan state entry {k}"


def _fold(m, ex, decompose=False, **kw):
    ep = _export(m, ex)
    if decompose:
        ep = ep.run_decompositions()
    folded, rep = fold_program(ep, **kw)
    return ep, folded, rep


def _reason(rep, site):
    for d in rep.skipped:
        if d["norm"] == site:
            return d["reason"]
    raise AssertionError(f"{site} not skipped: {rep.to_dict()}")


# --------------------------------------------------------------------------- the architectures


@pytest.mark.parametrize("decompose", [False, True], ids=["training_ir", "decomposed"])
@pytest.mark.parametrize("factory", [resnet_style, mobilenet_style, convtranspose_decoder],
                         ids=["resnet_block", "mobilenet_depthwise", "convtranspose_groups2"])
def test_architectures_fold_completely(factory, decompose):
    m, ex = factory()
    ep, folded, rep = _fold(m, ex, decompose)
    assert _bn_count(ep) > 0
    assert rep.skipped == [], rep.skipped
    assert _bn_count(folded) == 0
    assert rep.verification["ok"]
    with torch.no_grad():
        assert _close(m(*ex), folded.module()(*ex))
        x2 = tuple(torch.randn_like(t) * 2 + 0.5 for t in ex)  # inputs other than the verification's
        assert _close(m(*x2), folded.module()(*x2))
    _consistent(folded)
    # the original program is not modified
    assert _bn_count(ep) > 0
    with torch.no_grad():
        assert _close(m(*ex), ep.module()(*ex), 1e-6)


def test_sites_are_module_names():
    m, ex = resnet_style()
    _, _, rep = _fold(m, ex)
    names = {d["norm"]: d["into"] for d in rep.folded}
    assert names["layers.0.0.bn1"] == "layers.0.0.conv1"
    assert names["layers.0.0.downsample.1"] == "layers.0.0.downsample.0"
    assert all(d["kind"] == "bn" and d["pattern"] == "conv_bn" for d in rep.folded)


def test_convtranspose_pattern_and_new_bias_parameter():
    m, ex = convtranspose_decoder()  # up1 has no bias: the fold adds one
    ep, folded, rep = _fold(m, ex)
    assert {d["pattern"] for d in rep.folded} == {"convtranspose_bn"}
    assert "up1.bias" in folded.state_dict and "up1.bias" not in ep.state_dict
    assert isinstance(folded.state_dict["up1.bias"], nn.Parameter)
    assert "up1.bias" in folded.graph_signature.parameters
    assert not any(k.startswith("bn1.") for k in folded.state_dict)


@pytest.mark.parametrize("decompose", [False, True], ids=["training_ir", "decomposed"])
def test_linear_bn1d_2d_folds(decompose):
    m, ex = ALL_SAMPLES["mlp_bn1d"]()
    _, folded, rep = _fold(m, ex, decompose)
    assert sorted(d["norm"] for d in rep.folded) == ["bn1", "bn2"]
    assert {d["pattern"] for d in rep.folded} == {"linear_bn"}
    assert _bn_count(folded) == 0
    with torch.no_grad():
        assert _close(m(*ex), folded.module()(*ex))


def test_linear_without_bias_decomposed_mm():
    m = nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    randomize_norm_stats(m).eval()
    x = torch.randn(4, 6)
    _, folded, rep = _fold(m, (x,), decompose=True)
    assert [d["norm"] for d in rep.folded] == ["1"]
    with torch.no_grad():
        assert _close(m(x), folded.module()(x))


@pytest.mark.parametrize("decompose", [False, True], ids=["training_ir", "decomposed"])
def test_linear_bn1d_on_3d_input_refused(decompose):
    m, ex = ALL_SAMPLES["mlp_bn1d_3d"]()  # (N, L, C) with L == C: BN normalises L
    _, folded, rep = _fold(m, ex, decompose)
    assert rep.folded == []
    r = _reason(rep, "bn")
    assert "proj" in r and ("rank-3" in r or "aten.view" in r), r


# --------------------------------------------------------------------------- hidden traps: one reason each


class _SkipPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return F.relu(self.bn(y)) + y  # the conv output also feeds the skip path


class _CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))


class _TiedConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv2.weight = self.conv1.weight  # the same weight in two convs
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv1(x)) * self.bn2(self.conv2(x))


class _WeightUsedElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.sum()  # tied to another use


class _BiasUsedElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.bias.reshape(1, -1, 1, 1)


def _trap(cls):
    m = randomize_norm_stats(cls()).eval()
    return m, (torch.randn(2, 4, 6, 6),)


def _refused(cls, site, *words):
    m, ex = _trap(cls)
    _, folded, rep = _fold(m, ex)
    r = _reason(rep, site)
    for w in words:
        assert w in r, r
    with torch.no_grad():
        assert _close(m(*ex), folded.module()(*ex), 1e-6)
    return rep


def test_trap_skip_path_refused():
    rep = _refused(_SkipPath, "bn", "output of 'conv' is used by more than one consumer")
    assert rep.folded == []


def test_trap_shared_producer_refused():
    m, ex = ALL_SAMPLES["shared_producer"]()
    _, folded, rep = _fold(m, ex)
    assert rep.folded == []
    for site in ("bn_a", "bn_b"):
        assert "output of 'conv' is used by more than one consumer" in _reason(rep, site)


def test_trap_conv_called_twice_into_two_bns_refused():
    rep = _refused(_CalledTwice, "bn_a", "'conv' is called at several places whose call sites differ",
                   "bn_b")
    assert rep.folded == []


def test_trap_same_weight_in_two_convs_refused():
    rep = _refused(_TiedConvs, "bn1", "shared (tied) with 'conv2'")
    assert "shared (tied) with 'conv1'" in _reason(rep, "bn2")
    assert rep.folded == []


def test_trap_weight_used_elsewhere_refused():
    _refused(_WeightUsedElsewhere, "bn", "weight of 'conv' is shared (tied) with", "aten.sum")


def test_trap_bias_used_elsewhere_refused():
    _refused(_BiasUsedElsewhere, "bn", "bias of 'conv' is also used by")


def test_pair_called_twice_folds_once():
    m, ex = ALL_SAMPLES["shared_pair"]()  # the same conv+BN pair at two places: one fold serves both
    ep, folded, rep = _fold(m, ex)
    assert [d["norm"] for d in rep.folded] == ["bn"]
    assert _bn_count(ep) == 2 and _bn_count(folded) == 0
    with torch.no_grad():
        assert _close(m(*ex), folded.module()(*ex))


def test_train_mode_refused():
    m, ex = ALL_SAMPLES["train_mode"]()
    for ev in (False, True):
        _, folded, rep = _fold(m, ex, eval=ev)
        assert rep.folded == []
        assert all("training mode" in d["reason"] for d in rep.skipped)
        assert {d["norm"] for d in rep.skipped} >= {"bn1", "layers.0.0.bn1"}


def test_non_finite_stats_refused():
    m, ex = ALL_SAMPLES["nan_stats"]()
    _, _, rep = _fold(m, ex)
    assert "non-finite statistics" in _reason(rep, "bn1")
    assert "non-finite statistics" in _reason(rep, "bn2")


def test_no_running_stats_refused():
    m, ex = ALL_SAMPLES["untrained_stats"]()
    _, _, rep = _fold(m, ex)
    assert "track_running_stats=False" in _reason(rep, "bn2")
    assert [d["norm"] for d in rep.folded] == ["bn1"]


def test_bn_after_non_layer_refused():
    m, ex = ALL_SAMPLES["preact"]()
    _, folded, rep = _fold(m, ex)
    assert [d["norm"] for d in rep.folded] == ["block.bn2"]
    # the one planner's wording (as for the eager model): nothing before it, and why not after it
    assert "nothing foldable before it (its input is 'block' (aten.add))" in _reason(rep, "bn")
    with torch.no_grad():
        assert _close(m(*ex), folded.module()(*ex))


def test_failed_verification_returns_original(monkeypatch):
    from normswap.fold import apply_program as program

    orig = program.arith.fold_affine_after_conv

    def wrong(w, b, s, t):
        w2, b2 = orig(w, b, s, t)
        return w2 * 1.5, b2

    monkeypatch.setattr(program.arith, "fold_affine_after_conv", wrong)
    m, ex = resnet_style()
    ep, folded, rep = _fold(m, ex)
    assert folded is ep
    assert rep.verification["ok"] is False and not rep.passed
    assert rep.folded == [] and all("failed verification" in d["reason"] for d in rep.skipped)


def test_explicit_example_inputs_and_no_inputs():
    m, ex = mobilenet_style()
    ep = _export(m, ex)
    _, rep = fold_program(ep, torch.randn(2, 3, 16, 16) * 3)
    assert rep.verification["ok"]
    ep2 = ep.run_decompositions()
    ep2.example_inputs = None
    folded, rep2 = fold_program(ep2)
    assert rep2.verification is None and any("not verified" in n for n in rep2.notes)
    assert len(rep2.folded) == 3


def test_plan_matches_fold():
    m, ex = ALL_SAMPLES["shared_producer"]()
    ep = _export(m, ex)
    assert [(s.norm, s.foldable) for s in plan_program(ep)] == [("bn_a", False), ("bn_b", False)]


# --------------------------------------------------------------------------- round trips and lowering


def test_save_load_round_trip(tmp_path):
    m, ex = convtranspose_decoder()
    _, folded, _ = _fold(m, ex)
    path = tmp_path / "model.folded.pt2"
    torch.export.save(folded, str(path))
    loaded = torch.export.load(str(path))
    assert _bn_count(loaded) == 0
    _consistent(loaded)
    with torch.no_grad():
        assert _close(m(*ex), loaded.module()(*ex))
    # a loaded program folds again (nothing left) and a loaded unfolded one folds
    buf = io.BytesIO()
    torch.export.save(_export(m, ex), buf)
    buf.seek(0)
    again, rep = fold_program(torch.export.load(buf), ex)
    assert len(rep.folded) == 2 and rep.verification["ok"]


def test_lowering_after_fold():
    m, ex = resnet_style()
    _, folded, _ = _fold(m, ex)
    dec = folded.run_decompositions()
    assert _bn_count(dec) == 0
    with torch.no_grad():
        assert _close(m(*ex), dec.module()(*ex))


def test_onnx_export_after_fold(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    m, ex = mobilenet_style()
    _, folded, _ = _fold(m, ex)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onx = torch.onnx.export(folded, dynamo=True, optimize=False)
    path = tmp_path / "m.onnx"
    onx.save(str(path))
    import onnx

    model = onnx.load(str(path))
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: ex[0].numpy()})[0]
    with torch.no_grad():
        assert _close(m(*ex), torch.from_numpy(out), 1e-4)


# --------------------------------------------------------------------------- differential property test

hyp = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@st.composite
def _conv_cfg(draw):
    d = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    bias = draw(st.booleans())
    decompose = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    log_var = draw(st.sampled_from([(-1.0, 0.5), (-8.0, -4.0)]))
    return dict(d=d, transposed=transposed, groups=groups, cin=cin, cout=cout, k=k, stride=stride,
                dilation=dilation, padding=padding, bias=bias, decompose=decompose, seed=seed,
                log_var=log_var)


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(_conv_cfg())
def test_property_conv_bn_through_pt2(cfg):
    g = torch.Generator().manual_seed(cfg["seed"])
    d = cfg["d"]
    cls = _CONVT[d] if cfg["transposed"] else _CONV[d]
    extra = {"output_padding": 0} if cfg["transposed"] else {}
    conv = cls(cfg["cin"], cfg["cout"], cfg["k"], stride=cfg["stride"], padding=cfg["padding"],
               dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"], **extra)
    bn = _BN[d](cfg["cout"])
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(cfg["cout"], generator=g) * 3)
        lv = torch.empty(cfg["cout"]).uniform_(*cfg["log_var"], generator=g)
        bn.running_var.copy_(10.0 ** lv)
        bn.weight.copy_(torch.rand(cfg["cout"], generator=g) + 0.5)
        bn.bias.copy_(torch.randn(cfg["cout"], generator=g))
    m = nn.Sequential(conv, bn).eval()
    size = {1: 9, 2: 7, 3: 5}[d]
    x = torch.randn((2, cfg["cin"]) + (size,) * d, generator=g)
    ep, folded, rep = _fold(m, (x,), cfg["decompose"])
    assert rep.skipped == [], rep.skipped
    assert rep.folded[0]["pattern"] == ("convtranspose_bn" if cfg["transposed"] else "conv_bn")
    assert _bn_count(folded) == 0
    with torch.no_grad():
        y = m(x)
        y2 = folded.module()(x)
    scale = float(y.abs().max())
    assert float((y - y2).abs().max()) <= 1e-5 * (1 + scale)


# --------------------------------------------------------------------------- agreement with the eager fold

#: sites the program fold folds although the eager fold refuses them, because the program
#: graph proves more than the module structure: the plain BatchNorm inside a conditional /
#: sandwich BatchNorm is followed by its (input-dependent) affine as separate graph ops, so
#: its statistics fold exactly into the conv before it; the eager fold refuses the whole module.
#: Likewise a timm-style BatchNormAct2d (a BatchNorm2d subclass whose forward also applies an
#: activation): eager refuses the subclass (it would replace the module, act included); in the
#: program the activation is its own op after the BatchNorm op, so the BatchNorm op folds.
_PT2_EXTRA = {"cond_generator": {"cbn1.bn", "cbn2.bn"}, "sabn_net": {"sabn1.bn", "sabn2.bn"},
              "timm_bnact": {"1"}}


def _exportable():
    out = []
    for name, fn in ALL_SAMPLES.items():
        if name in ("untraceable",):  # data-dependent control flow: torch.export refuses it
            continue
        out.append(name)
    return out


@pytest.mark.parametrize("name", _exportable())
def test_eager_and_program_fold_agree(name):
    from normswap.fold import fold

    m, ex = ALL_SAMPLES[name]()
    try:
        ep = _export(m, ex)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torch.export cannot export {name}: {type(e).__name__}")
    _, prep = fold_program(ep)
    _, erep = fold(m, ex)
    bn_kinds = {"bn", "functional_bn", "ln", "rms", "functional_ln", "functional_rms"}
    eager = {d["norm"]: True for d in erep.folded if d["kind"] in bn_kinds}
    eager.update({d["norm"]: False for d in erep.skipped if d["kind"] in bn_kinds})
    prog = {d["norm"]: True for d in prep.folded}
    prog.update({d["norm"]: False for d in prep.skipped})
    extra = _PT2_EXTRA.get(name, set())
    assert {k for k, v in prog.items() if v} - extra == {k for k, v in eager.items() if v}
    # every eager BatchNorm site is a program site with the same verdict
    for site, ok in eager.items():
        assert site in prog, (site, sorted(prog))
        assert prog[site] == ok or site in extra, (site, prep.skipped, erep.skipped)
    if prep.verification is not None:
        assert prep.verification["ok"]


@pytest.mark.parametrize("decompose", [False, True], ids=["training_ir", "decomposed"])
def test_bn_output_is_program_output(decompose):
    m = randomize_norm_stats(nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3))).eval()
    x = torch.randn(2, 2, 9)
    _, folded, rep = _fold(m, (x,), decompose)
    assert rep.verification["ok"] and _bn_count(folded) == 0
    buf = io.BytesIO()
    torch.export.save(folded, buf)
    buf.seek(0)
    with torch.no_grad():
        assert _close(m(x), torch.export.load(buf).module()(x))


def test_norm_affines_into_following_linear():
    m, ex = ALL_SAMPLES["transformer"]()
    ep, folded, rep = _fold(m, ex)
    got = {d["norm"]: d["into"] for d in rep.folded}
    assert got == {"block.norm2": "block.mlp.0", "norm": "head"}
    assert "block.attn" in _reason(rep, "block.norm1")
    assert "norm.weight" not in folded.state_dict and "block.norm2.weight" not in folded.state_dict
    _consistent(folded)
    with torch.no_grad():
        assert _close(m(*ex), folded.module()(*ex))


def test_norm_affine_into_tied_linear_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(6)
            self.fc = nn.Linear(6, 6)
            self.fc2 = nn.Linear(6, 6)
            self.fc2.weight = self.fc.weight

        def forward(self, x):
            return self.fc(self.ln(x)) + self.fc2(x)

    m = randomize_norm_stats(Tied()).eval()
    x = torch.randn(3, 6)
    _, folded, rep = _fold(m, (x,))
    assert "shared (tied)" in _reason(rep, "ln")
