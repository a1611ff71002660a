"""normswap.locate: the first layer where onnxruntime and PyTorch diverge."""

import json

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

from normswap.locate import locate  # noqa: E402


def _export(model, x, path, opset=None):
    from normswap.export import export

    export(model, path, (x,), opset=opset)
    return path


def _tamper(src, dst, name, factor=1.5):
    proto = onnx.load(str(src))
    hit = [t for t in proto.graph.initializer if t.name == name]
    assert hit, [t.name for t in proto.graph.initializer]
    t = hit[0]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * factor, t.name))
    onnx.save(proto, str(dst))
    return dst


def _convnet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),  # "4": tampered
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(self.act(self.bn(self.conv(x))))


class _ResNet(nn.Module):
    """Conv+BN blocks (folded by the exporter), in-place ReLU, Dropout, a residual add, GroupNorm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = _Block(8)
        self.b2 = _Block(8)
        self.gn = nn.GroupNorm(2, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)

    def forward(self, x):
        x = self.stem(x)
        x = self.b1(x)
        x = x + self.b2(x)
        x = self.gn(x)
        return self.fc(self.pool(x).flatten(1))


def test_tampered_conv_is_located_at_that_layer(tmp_path):
    model = _convnet()
    x = torch.randn(2, 3, 8, 8)
    src = _export(model, x, tmp_path / "m.onnx")
    bad = _tamper(src, tmp_path / "bad.onnx", "4.weight")
    r = locate(model, bad, (x,))
    assert not r
    assert r.status == "diverged"
    names = [lp.name for lp in r.layers]
    assert names == [str(i) for i in range(11)]  # every leaf mapped, in execution order
    assert r.unmapped == []
    fd = r.first_divergent
    assert fd is not None and fd.name == "4" and fd.type == "Conv2d"
    assert fd.own_max_abs > 100 * fd.tolerance
    assert fd.own_max_abs == pytest.approx(fd.acc_max_abs, rel=1e-3)
    k = names.index("4")
    for lp in r.layers[:k]:  # before: clean
        assert lp.acc_passed and lp.own_passed, lp
    for lp in r.layers[k + 1:]:  # after: inherited, not own
        assert lp.own_passed is True, lp
        assert not lp.acc_passed, lp
        assert lp.inherited
    assert r.first_accumulated.name == "4"
    d = r.to_dict()
    json.dumps(d)
    assert d["first_divergent"]["name"] == "4"
    assert len(d["layers"]) == 11 and d["passed"] is False
    assert "first divergent layer: 4 (Conv2d)" in r.summary_text()


def test_tampered_conv_folded_into_bn_is_named_with_the_fold(tmp_path):
    model = _ResNet().eval()
    x = torch.randn(2, 3, 8, 8)
    src = _export(model, x, tmp_path / "m.onnx")  # default export: Conv+BN folded
    bad = _tamper(src, tmp_path / "bad.onnx", "b2.conv.weight")
    r = locate(model, bad, (x,))
    fd = r.first_divergent
    assert fd is not None and fd.name == "b2.bn" and fd.fused == ["b2.conv"]
    assert any(u.startswith("b2.conv ") and "b2.bn" in u for u in r.unmapped)
    after = r.layers[fd.index + 1:]
    assert after and all(lp.own_passed and not lp.acc_passed for lp in after)
    # the residual add feeds gn: its own input is PyTorch's input to gn (not an ONNX value)
    assert r.layer("gn").own_passed is True


def test_untampered_model_reports_no_divergence(tmp_path):
    model = _ResNet().eval()
    x = torch.randn(2, 3, 8, 8)
    src = _export(model, x, tmp_path / "m.onnx")
    r = locate(model, src, (x,))
    assert r, r.summary_text()
    assert r.status == "ok" and r.first_divergent is None and r.first_accumulated is None
    assert [lp.name for lp in r.layers] == ["stem", "b1.bn", "b1.act", "b2.bn", "b2.act", "gn", "pool", "fc"]
    assert all(lp.own_passed is True for lp in r.layers), [(lp.name, lp.own_reason) for lp in r.layers]
    un = {u.split(" ", 1)[0]: u for u in r.unmapped}
    assert set(un) == {"b1.conv", "b2.conv", "b1.drop", "b2.drop"}
    assert "identity" in un["b1.drop"] and "folded" in un["b1.conv"]
    assert r.mapping == "name_scopes" and r.provider == "cpu" and r.ran == "CPUExecutionProvider"
    assert all(o["passed"] for o in r.outputs)
    assert "no divergence" in r.summary_text()
    json.dumps(r.to_dict())


def test_keep_norms_maps_every_layer(tmp_path):
    from normswap.export import export

    model = _ResNet().eval()
    x = torch.randn(2, 3, 8, 8)
    export(model, tmp_path / "k.onnx", (x,), keep_norms=True)
    r = locate(model, tmp_path / "k.onnx", (x,))
    assert r and r.unmapped == []
    assert "b1.conv" in [lp.name for lp in r.layers] and r.layer("b1.bn").onnx_nodes == ["BatchNormalization"]


def _gn_model():
    m = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).eval()
    with torch.no_grad():  # an identity 1x1 conv: the large mean reaches the GroupNorm
        m[0].weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        m[0].bias.zero_()
    return m


def test_groupnorm_opset21_large_mean_is_located_at_the_groupnorm(tmp_path):
    model = _gn_model()
    x = torch.randn(2, 4, 8, 8) + 1000
    path = tmp_path / "gn21.onnx"
    torch.onnx.export(model, (x,), dynamo=True, opset_version=21, external_data=False, report=False, verbose=False).save(
        str(path)
    )
    assert "GroupNormalization" in {n.op_type for n in onnx.load(str(path)).graph.node}
    r = locate(model, path, (x,))
    assert not r
    fd = r.first_divergent
    assert fd is not None and fd.name == "1" and fd.type == "GroupNorm"
    assert fd.onnx_nodes == ["GroupNormalization"]
    assert fd.own_max_abs > 10 * fd.tolerance
    assert r.layer("0").own_passed and r.layer("0").acc_passed
    for lp in r.layers[fd.index + 1:]:
        assert lp.own_passed and not lp.acc_passed


def test_groupnorm_default_opset_large_mean_has_no_divergence(tmp_path):
    model = _gn_model()
    x = torch.randn(2, 4, 8, 8) + 1000
    path = _export(model, x, tmp_path / "gn18.onnx")  # opset 18: InstanceNormalization decomposition
    r = locate(model, path, (x,))
    assert r, r.summary_text()


def test_cuda_unavailable_is_reported_not_passed(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    model = _convnet()
    x = torch.randn(1, 3, 8, 8)
    src = _export(model, x, tmp_path / "m.onnx")
    r = locate(model, src, (x,), providers=("cuda",))
    assert r.status == "unavailable" and not r and r.layers == []
    assert "cuda" in r.unavailable
    r2 = locate(model, src, (x,), providers=("cuda", "cpu"))
    assert r2 and r2.provider == "cpu" and "cuda" in r2.unavailable
    assert json.dumps(r.to_dict())


def test_training_mode_restored_and_inputs_checked(tmp_path):
    from normswap.errors import NormswapError

    model = _ResNet().eval()
    x = torch.randn(2, 3, 8, 8)
    src = _export(model, x, tmp_path / "m.onnx")
    model.train()
    r = locate(model, src, (x,))
    assert r and all(m.training for m in model.modules())
    assert any("training mode" in n for n in r.notes)
    with pytest.raises(NormswapError):
        locate(model, src, (x, x))
    with pytest.raises(NormswapError):
        locate(model, tmp_path / "missing.onnx", (x,))


def test_locate_text_fits_80_columns_and_keeps_names(tmp_path):
    from normswap.locate import locate_text

    model = _ResNet().eval()
    x = torch.randn(2, 3, 8, 8)
    bad = _tamper(_export(model, x, tmp_path / "m.onnx"), tmp_path / "bad.onnx", "b2.conv.weight")
    d = locate(model, bad, (x,)).to_dict()
    text = locate_text(d)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "b2.bn (BatchNorm2d" in text and "b2.conv folded in" in text
    long = "encoder." * 12 + "norm"
    d["first_divergent"]["name"] = long
    assert long in locate_text(d)  # longer than a line: on its own line, not cut
