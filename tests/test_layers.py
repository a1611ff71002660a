"""Tests for normswap.layers: formulas (float64, written out independently), running statistics,
train/eval behaviour, and ONNX export + onnxruntime parity with a dynamic batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normswap.layers as L
from normswap.layers import (
    BatchGroupNorm2d,
    ConditionalBatchNorm2d,
    FilterResponseNorm2d,
    PowerNorm2d,
    SandwichBatchNorm2d,
)

F64 = dict(atol=1e-10, rtol=1e-10)


def _randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter a non-trivial value (scales around 1, shifts around 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + 0.7)
    return module


def _x(*shape, seed=0, scale=2.0, offset=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset)


# --------------------------------------------------------------------------------------
# Filter Response Norm
# --------------------------------------------------------------------------------------

def _frn_ref(x, gamma, beta, tau, eps):
    out = torch.empty_like(x)
    n, c = x.shape[:2]
    for i in range(n):
        for j in range(c):
            xij = x[i, j]
            nu2 = (xij * xij).sum() / xij.numel()
            y = gamma[j] * xij / torch.sqrt(nu2 + abs(float(eps))) + beta[j]
            out[i, j] = torch.where(y > tau[j], y, tau[j].expand_as(y))
    return out


@pytest.mark.parametrize("learnable_eps", [False, True])
def test_frn_formula_train_and_eval(learnable_eps):
    torch.manual_seed(0)
    m = _randomize_(FilterResponseNorm2d(4, eps=1e-3, learnable_eps=learnable_eps), 1).double()
    with torch.no_grad():
        m.eps.fill_(-2e-2)  # |eps| must be used (a learned eps can go negative)
    x = _x(3, 4, 5, 6)
    ref = _frn_ref(x, m.weight.detach(), m.bias.detach(), m.tau.detach(), -2e-2)
    m.train()
    torch.testing.assert_close(m(x), ref, **F64)
    m.eval()
    torch.testing.assert_close(m(x), ref, **F64)
    # the TLU actually clips something in this setup, so max(y, tau) is exercised
    assert (ref == m.tau.detach().view(1, 4, 1, 1).expand_as(ref)).any()


def test_frn_params_and_eps_kind():
    torch.manual_seed(0)
    m = FilterResponseNorm2d(3)
    assert {n for n, _ in m.named_parameters()} == {"weight", "bias", "tau"}
    assert "eps" in dict(m.named_buffers())
    ml = FilterResponseNorm2d(3, learnable_eps=True)
    assert {n for n, _ in ml.named_parameters()} == {"weight", "bias", "tau", "eps"}
    x = torch.randn(2, 3, 1, 1)  # 1x1 maps: the case the learnable eps is for
    ml(x).sum().backward()
    assert ml.eps.grad is not None and torch.isfinite(ml.eps.grad).all()
    # fresh layer: gamma=1, beta=0, tau=0 -> relu(x / rms)
    x = torch.randn(2, 3, 4, 4)
    ref = torch.relu(x / torch.sqrt(x.pow(2).mean((2, 3), keepdim=True) + 1e-6))
    torch.testing.assert_close(m(x), ref)
    assert "learnable_eps=True" in repr(ml) and "eps=1e-06" in repr(m)
    with pytest.raises(ValueError):
        m(torch.randn(2, 4, 3, 3))


# --------------------------------------------------------------------------------------
# Power Norm
# --------------------------------------------------------------------------------------

def _pn_psi2(x):
    c = x.shape[1]
    return torch.stack([(x[:, j] ** 2).sum() / x[:, j].numel() for j in range(c)])


def _pn_apply(x, phi, gamma, beta, eps):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return gamma.view(shape) * x / torch.sqrt(phi.view(shape) + eps) + beta.view(shape)


@pytest.mark.parametrize("shape", [(6, 4), (4, 4, 7), (3, 4, 5, 5)])
def test_powernorm_train_eval_and_running_phi(shape):
    torch.manual_seed(0)
    eps, mom = 1e-3, 0.3
    m = _randomize_(PowerNorm2d(4, eps=eps, momentum=mom), 2).double()
    gamma, beta = m.weight.detach().clone(), m.bias.detach().clone()
    phi = torch.ones(4, dtype=torch.float64)
    m.train()
    for step in range(3):
        x = _x(*shape, seed=10 + step, offset=1.0)
        psi2 = _pn_psi2(x)
        torch.testing.assert_close(m(x), _pn_apply(x, psi2, gamma, beta, eps), **F64)
        phi = (1 - mom) * phi + mom * psi2
        torch.testing.assert_close(m.running_phi, phi, **F64)
    m.eval()
    x = _x(*shape, seed=99)
    before = m.running_phi.clone()
    torch.testing.assert_close(m(x), _pn_apply(x, phi, gamma, beta, eps), **F64)
    assert torch.equal(m.running_phi, before)  # eval never updates
    # no mean subtraction: a constant positive input is not centred to zero
    assert m.training is False and (PowerNorm2d(4).train()(torch.full((2, 4), 3.0)) > 0.9).all()


def test_powernorm_no_affine_and_repr():
    torch.manual_seed(0)
    m = PowerNorm2d(3, affine=False)
    assert m.weight is None and m.bias is None and len(list(m.parameters())) == 0
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    m.double().train()
    torch.testing.assert_close(m(x), x / torch.sqrt(_pn_psi2(x).view(1, 3, 1, 1) + 1e-5), **F64)
    assert "momentum=0.1" in repr(m) and "affine=False" in repr(m)
    with pytest.raises(ValueError):
        m(torch.randn(2, 3, 2, 2, 2, dtype=torch.float64))


# --------------------------------------------------------------------------------------
# Batch Group Norm
# --------------------------------------------------------------------------------------

def _bgn_ref(x, groups, mean, var, gamma, beta, eps):
    out = torch.empty_like(x)
    cg = x.shape[1] // groups
    for g in range(groups):
        sl = slice(g * cg, (g + 1) * cg)
        out[:, sl] = (x[:, sl] - mean[g]) / torch.sqrt(var[g] + eps)
    return out * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def _bgn_stats(x, groups):
    cg = x.shape[1] // groups
    blocks = [x[:, g * cg:(g + 1) * cg].reshape(-1) for g in range(groups)]
    mean = torch.stack([b.sum() / b.numel() for b in blocks])
    var_b = torch.stack([((b - mu) ** 2).sum() / b.numel() for b, mu in zip(blocks, mean)])
    var_u = torch.stack([((b - mu) ** 2).sum() / (b.numel() - 1) for b, mu in zip(blocks, mean)])
    return mean, var_b, var_u


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_bgn_train_eval_and_running_stats(groups):
    torch.manual_seed(0)
    eps, mom = 1e-4, 0.25
    m = _randomize_(BatchGroupNorm2d(6, groups, eps=eps, momentum=mom), 3).double()
    gamma, beta = m.weight.detach().clone(), m.bias.detach().clone()
    rm, rv = torch.zeros(groups, dtype=torch.float64), torch.ones(groups, dtype=torch.float64)
    m.train()
    for step in range(3):
        # different offsets per channel so the groups really have different statistics
        x = _x(4, 6, 3, 5, seed=20 + step) + torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1)
        mean, var_b, var_u = _bgn_stats(x, groups)
        torch.testing.assert_close(m(x), _bgn_ref(x, groups, mean, var_b, gamma, beta, eps), **F64)
        rm = (1 - mom) * rm + mom * mean
        rv = (1 - mom) * rv + mom * var_u
        torch.testing.assert_close(m.running_mean, rm, **F64)
        torch.testing.assert_close(m.running_var, rv, **F64)
    assert m.running_mean.shape == (groups,) and m.running_var.shape == (groups,)
    m.eval()
    x = _x(2, 6, 3, 5, seed=98)
    torch.testing.assert_close(m(x), _bgn_ref(x, groups, rm, rv, gamma, beta, eps), **F64)
    torch.testing.assert_close(m.running_mean, rm, **F64)


def test_bgn_with_one_channel_per_group_is_batchnorm():
    torch.manual_seed(0)
    m = _randomize_(BatchGroupNorm2d(5, 5, momentum=0.2), 4)
    bn = nn.BatchNorm2d(5, momentum=0.2)
    bn.load_state_dict({"weight": m.weight, "bias": m.bias}, strict=False)
    for step in range(3):
        x = torch.randn(3, 5, 4, 4) * 3 + 1
        torch.testing.assert_close(m(x), bn(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)
    m.eval(), bn.eval()
    x = torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(m(x), bn(x), atol=1e-5, rtol=1e-5)


def test_bgn_validation_and_repr():
    with pytest.raises(ValueError):
        BatchGroupNorm2d(6, 4)
    m = BatchGroupNorm2d(6, 3, affine=False)
    assert m.weight is None and "num_groups=3" in repr(m)


# --------------------------------------------------------------------------------------
# Conditional BN and Sandwich BN (shared BN reference)
# --------------------------------------------------------------------------------------

def _bn_stats(x):
    c = x.shape[1]
    mean = torch.stack([x[:, j].sum() / x[:, j].numel() for j in range(c)])
    var_b = torch.stack([((x[:, j] - mean[j]) ** 2).sum() / x[:, j].numel() for j in range(c)])
    var_u = torch.stack([((x[:, j] - mean[j]) ** 2).sum() / (x[:, j].numel() - 1) for j in range(c)])
    return mean, var_b, var_u


def _xhat(x, mean, var, eps):
    return (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + eps)


def _per_sample_affine(h, gamma, beta):  # gamma, beta (N, C)
    out = torch.empty_like(h)
    for i in range(h.shape[0]):
        for j in range(h.shape[1]):
            out[i, j] = gamma[i, j] * h[i, j] + beta[i, j]
    return out


def test_cbn_init_is_plain_bn():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    bn = nn.BatchNorm2d(3, affine=False)
    for cbn, cond in [
        (ConditionalBatchNorm2d(3, num_classes=7), torch.tensor([0, 6, 3, 3])),
        (ConditionalBatchNorm2d(3, cond_dim=5), torch.randn(4, 5)),
    ]:
        torch.testing.assert_close(cbn(x, cond), bn.train()(x))
        cbn.eval(), bn.eval()
        torch.testing.assert_close(cbn(x, cond), bn(x))
        bn.reset_running_stats()
    with pytest.raises(ValueError):
        ConditionalBatchNorm2d(3)
    with pytest.raises(ValueError):
        ConditionalBatchNorm2d(3, num_classes=2, cond_dim=4)


@pytest.mark.parametrize("mode", ["classes", "vector"])
def test_cbn_train_eval_and_running_stats(mode):
    torch.manual_seed(0)
    eps, mom, C = 1e-3, 0.2, 4
    if mode == "classes":
        m = ConditionalBatchNorm2d(C, num_classes=5, eps=eps, momentum=mom)
        conds = [torch.tensor([4, 0, 2]), torch.tensor([1, 1, 3]), torch.tensor([0, 4, 4])]
    else:
        m = ConditionalBatchNorm2d(C, cond_dim=6, eps=eps, momentum=mom)
        conds = [_x(3, 6, seed=40 + k) for k in range(3)]
    _randomize_(m, 5).double()
    assert m.bn.affine is False
    W = (m.embed.weight if mode == "classes" else m.proj.weight).detach()

    def gamma_beta(cond):
        if mode == "classes":
            gb = torch.stack([W[int(k)] for k in cond])
        else:
            b = m.proj.bias.detach()
            gb = torch.stack([W @ ci + b for ci in cond])
        return gb[:, :C], gb[:, C:]

    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    m.train()
    for step in range(3):
        x = _x(3, C, 4, 4, seed=30 + step)
        mean, var_b, var_u = _bn_stats(x)
        ref = _per_sample_affine(_xhat(x, mean, var_b, eps), *gamma_beta(conds[step]))
        torch.testing.assert_close(m(x, conds[step]), ref, **F64)
        rm, rv = (1 - mom) * rm + mom * mean, (1 - mom) * rv + mom * var_u
    torch.testing.assert_close(m.bn.running_mean, rm, **F64)
    torch.testing.assert_close(m.bn.running_var, rv, **F64)
    m.eval()
    x = _x(3, C, 4, 4, seed=97)
    ref = _per_sample_affine(_xhat(x, rm, rv, eps), *gamma_beta(conds[0]))
    torch.testing.assert_close(m(x, conds[0]), ref, **F64)
    assert ("num_classes=5" if mode == "classes" else "cond_dim=6") in repr(m)


def test_sabn_train_eval_and_branches():
    torch.manual_seed(0)
    eps, mom, C = 1e-3, 0.15, 4
    m = _randomize_(SandwichBatchNorm2d(C, num_branches=3, eps=eps, momentum=mom), 6).double()
    assert m.bn.affine is True
    g_sa, b_sa = m.bn.weight.detach(), m.bn.bias.detach()
    E = m.embed.weight.detach()
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    branches = [torch.tensor([2, 0, 1]), torch.tensor([1, 1, 1]), torch.tensor([0, 2, 2])]
    m.train()
    for step in range(3):
        x = _x(3, C, 3, 4, seed=50 + step)
        mean, var_b, var_u = _bn_stats(x)
        h = _xhat(x, mean, var_b, eps) * g_sa.view(1, -1, 1, 1) + b_sa.view(1, -1, 1, 1)
        gi = torch.stack([E[int(k), :C] for k in branches[step]])
        bi = torch.stack([E[int(k), C:] for k in branches[step]])
        torch.testing.assert_close(m(x, branches[step]), _per_sample_affine(h, gi, bi), **F64)
        rm, rv = (1 - mom) * rm + mom * mean, (1 - mom) * rv + mom * var_u
    torch.testing.assert_close(m.bn.running_mean, rm, **F64)
    torch.testing.assert_close(m.bn.running_var, rv, **F64)
    m.eval()
    x = _x(3, C, 3, 4, seed=96)
    h = _xhat(x, rm, rv, eps) * g_sa.view(1, -1, 1, 1) + b_sa.view(1, -1, 1, 1)
    ref = _per_sample_affine(h, E[[1, 2, 0], :C], E[[1, 2, 0], C:])
    torch.testing.assert_close(m(x, torch.tensor([1, 2, 0])), ref, **F64)
    # python int and 0-d tensor select one branch for the whole batch
    ref2 = _per_sample_affine(h, E[[2, 2, 2], :C], E[[2, 2, 2], C:])
    torch.testing.assert_close(m(x, 2), ref2, **F64)
    torch.testing.assert_close(m(x, torch.tensor(2)), ref2, **F64)
    with pytest.raises(IndexError):
        m(x, 3)
    assert "num_branches=3" in repr(m)


def test_sabn_init_equals_bn():
    torch.manual_seed(0)
    m = SandwichBatchNorm2d(3, num_branches=2)
    bn = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(m(x, torch.tensor([0, 1, 0, 1])), bn(x))


def test_public_api():
    assert sorted(L.__all__) == sorted(
        ["FilterResponseNorm2d", "PowerNorm2d", "BatchGroupNorm2d", "ConditionalBatchNorm2d", "SandwichBatchNorm2d"]
    )
    for name in L.__all__:
        cls = getattr(L, name)
        assert issubclass(cls, nn.Module)
        assert "arXiv" in (cls.__doc__ or "") and "extra_repr" in vars(cls)


# --------------------------------------------------------------------------------------
# ONNX export + onnxruntime parity (eval mode, dynamic batch)
# --------------------------------------------------------------------------------------

def _trained(m: nn.Module, make_args, seed: int) -> nn.Module:
    """Randomise parameters, run a few training steps so running stats are non-trivial, then eval."""
    _randomize_(m, seed)
    m.train()
    with torch.no_grad():
        for k in range(3):
            m(*make_args(3, 100 + k))
    return m.eval()


def _frn(learnable):
    def build():
        m = FilterResponseNorm2d(4, learnable_eps=learnable)
        if learnable:
            with torch.no_grad():
                m.eps.fill_(-1e-2)
        return m
    return build


_X = lambda n, s, shape=(4, 5, 6): (torch.randn(n, *shape, generator=torch.Generator().manual_seed(s)) * 2 + 0.5,)
_EXPORT_CASES = {
    "frn": (_frn(False), _X),
    "frn_learnable_eps": (_frn(True), _X),
    "powernorm": (lambda: PowerNorm2d(4), _X),
    "powernorm_2d_input": (lambda: PowerNorm2d(4), lambda n, s: _X(n, s, (4,))),
    "bgn": (lambda: BatchGroupNorm2d(4, 2), _X),
    "cbn_classes": (
        lambda: ConditionalBatchNorm2d(4, num_classes=5),
        lambda n, s: _X(n, s) + (torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(s)),),
    ),
    "cbn_vector": (
        lambda: ConditionalBatchNorm2d(4, cond_dim=3),
        lambda n, s: _X(n, s) + (torch.randn(n, 3, generator=torch.Generator().manual_seed(s + 1)),),
    ),
    "sabn": (
        lambda: SandwichBatchNorm2d(4, num_branches=3),
        lambda n, s: _X(n, s) + (torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(s)),),
    ),
}


@pytest.mark.filterwarnings("ignore:.*axis name.*shares the same shape constraints")
@pytest.mark.parametrize("case", sorted(_EXPORT_CASES))
def test_onnx_export_parity(case, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    build, make_args = _EXPORT_CASES[case]
    m = _trained(build(), make_args, seed=7)
    args = make_args(3, 0)
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic_shapes = tuple({0: batch} for _ in args)
    prog = torch.onnx.export(m, args, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
    path = tmp_path / f"{case}.onnx"
    prog.save(str(path))  # one self-contained file (no .onnx.data side file)
    assert not list(tmp_path.glob("*.data"))
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert all(inp.type.tensor_type.shape.dim[0].dim_param for inp in model.graph.input)  # batch is symbolic
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for n, seed in [(3, 1), (5, 2), (1, 3)]:  # the export batch, a larger one, and 1
        run_args = make_args(n, seed)
        with torch.no_grad():
            expected = m(*run_args).numpy()
        got = sess.run(None, {k: a.numpy() for k, a in zip(names, run_args)})[0]
        assert got.shape == expected.shape
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(expected), atol=1e-5, rtol=1e-5)


def test_onnx_export_sabn_python_int_branch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m = _trained(SandwichBatchNorm2d(4, num_branches=3), lambda n, s: (torch.randn(n, 4, 5, 6), s % 3), seed=8)

    class Fixed(nn.Module):  # a python-int branch is baked into the graph as a constant
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x, 2)

    f = Fixed(m).eval()
    x = torch.randn(3, 4, 5, 6)
    prog = torch.onnx.export(f, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    path = tmp_path / "sabn_int.onnx"
    prog.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(6, 4, 5, 6)
    got = sess.run(None, {sess.get_inputs()[0].name: x2.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), f(x2), atol=1e-5, rtol=1e-5)
