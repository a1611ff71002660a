"""normswap.audit: exact sites, flags, untraceable parts, functional calls, TorchScript/.pt2,
JSON, CLI, speed."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normswap.audit import AuditReport, audit
from normswap.report import Report
from samples import models as S
from samples.models import ALL_SAMPLES

# name -> kind of every site each sample must have (exactly these)
EXPECTED = {
    "resnet_style": {n: "bn" for n in [
        "bn1", "layers.0.0.bn1", "layers.0.0.bn2", "layers.0.0.bn3", "layers.0.0.downsample.1",
        "layers.1.0.bn1", "layers.1.0.bn2", "layers.1.0.bn3", "layers.1.0.downsample.1"]},
    "mobilenet_style": {"stem.1": "bn", "dw_bn": "bn", "pw_bn": "bn"},
    "preact": {"block.bn1": "bn", "block.bn2": "bn", "bn": "bn"},
    "convtranspose_decoder": {"bn1": "bn", "bn2": "bn"},
    "mlp_bn1d": {"bn1": "bn", "bn2": "bn"},
    "mlp_bn1d_3d": {"bn": "bn"},
    "transformer": {"block.norm1": "ln", "block.norm2": "rms", "norm": "ln"},
    "llama_block": {"block.norm1": "custom", "block.norm2": "custom", "norm": "custom"},
    "unet": {"enc1.1": "gn", "gn_mid": "gn", "in_up": "in", "in_tracked": "in"},
    "gan_discriminator": {"conv1.weight": "spectral", "conv2.weight": "spectral", "fc.weight": "spectral"},
    "weight_norm_net": {"conv.weight": "weight_norm", "fc.weight": "weight_norm"},
    "cond_generator": {"cbn1": "cbn", "cbn2": "cbn"},
    "frn_net": {"norm1": "frn", "norm2": "frn"},
    "powernorm_net": {"norm1": "powernorm", "norm2": "powernorm"},
    "bgn_net": {"norm1": "bgn", "norm2": "bgn"},
    "sabn_net": {"sabn1": "sabn", "sabn2": "sabn"},
    "functional_norms": {"batch_norm": "bn", "group_norm": "gn", "instance_norm": "in",
                         "layer_norm": "ln", "rms_norm": "rms"},
    "lrn_net": {"lrn": "lrn"},
    "untraceable": {"stem.1": "bn", "block.bn": "bn", "head_bn": "bn"},
    "shared_pair": {"bn": "bn"},
    "shared_producer": {"bn_a": "bn", "bn_b": "bn"},
    "train_mode": {n: "bn" for n in ["bn1", "layers.0.0.bn1", "layers.0.0.bn2", "layers.0.0.bn3",
                                     "layers.0.0.downsample.1"]},
    "nan_stats": {"bn1": "bn", "bn2": "bn"},
    "tiny_var": {"bn1": "bn", "bn2": "bn"},
    "untrained_stats": {"bn1": "bn", "bn2": "bn"},
    "timm_bnact": {"1": "bn_act", "3": "bn"},  # timm BatchNormAct2d: recognised by structure
    "frozen_bn": {"1": "frozen_bn"},
    "layernorm2d": {"1": "ln2d"},
}

# the risk flags each sample must show (site -> flags); every other site has none
EXPECTED_FLAGS = {
    "train_mode": {n: {"train_mode"} for n in EXPECTED["train_mode"]},
    "nan_stats": {"bn1": {"nonfinite"}, "bn2": {"nonfinite"}},
    "tiny_var": {"bn1": {"tiny_var"}, "bn2": {"eps_zero"}},
    "untrained_stats": {"bn1": {"untrained_stats"}, "bn2": {"no_running_stats"}},
    "untraceable": {"block.bn": {"no_graph"}},
}


def test_every_sample_is_listed():
    assert set(ALL_SAMPLES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_sites_exact(name):
    model, inputs = ALL_SAMPLES[name]()
    model(*inputs)  # the sample runs
    rep = audit(model, inputs)
    assert isinstance(rep, AuditReport) and isinstance(rep, Report) and rep.job == "audit"
    assert {s.name: s.kind for s in rep.sites} == EXPECTED[name]
    flags = {s.name: set(s.flags) for s in rep.sites}
    want = EXPECTED_FLAGS.get(name, {})
    for site, f in flags.items():
        assert f == want.get(site, set()), (site, f)
    assert rep.passed and bool(rep)
    d = rep.to_dict()
    assert json.loads(json.dumps(d)) == d


def test_resnet_facts_and_fold():
    model, inputs = S.resnet_style()
    rep = audit(model)
    s = rep.site("layers.1.0.bn2")
    assert s.module_type == "BatchNorm2d" and s.mode == "eval" and s.affine and s.running_stats
    assert s.shape == {"num_features": 8} and s.eps == 1e-5
    assert s.producer["op"] == "conv" and s.producer["name"] == "layers.1.0.conv2"
    assert not s.producer_shared and not s.reused and s.graph
    assert s.consumers and s.consumers[0]["name"] == "layers.1.0.relu"
    assert s.foldable and s.reason is None
    assert s.onnx_ops == ["BatchNormalization"]
    assert rep.summary()["foldable"] == 9
    assert rep.summary_text() == "9 norm sites (bn 9), 9 foldable, 0 warnings"


def test_producer_kinds_and_blocking_facts():
    rep = audit(*S.convtranspose_decoder())
    assert rep.site("bn2").producer["op"] == "conv_transpose"
    rep = audit(*S.shared_producer())
    assert rep.site("bn_a").producer_shared and not rep.site("bn_a").foldable
    assert "conv" in rep.site("bn_a").reason
    rep = audit(*S.shared_pair())
    s = rep.site("bn")
    assert s.reused and s.calls == 2
    rep = audit(*S.preact())
    assert rep.site("bn").producer["op"] == "other" and not rep.site("bn").foldable
    rep = audit(*S.timm_bnact())
    s = rep.site("1")  # BN + act: its BN part folds into the conv, its activation stays
    assert s.kind == "bn_act" and s.module_type == "BatchNormAct2d" and s.foldable and s.fold_into == "0"

    class MoreThanTimm(S.BatchNormAct2d):  # a subclass with more than timm's structure
        def __init__(self, c):
            super().__init__(c)
            self.gate = nn.Sigmoid()

    m = nn.Sequential(nn.Conv2d(3, 6, 3), MoreThanTimm(6)).eval()
    s = audit(m, (torch.randn(1, 3, 6, 6),)).site("1")
    assert s.kind == "unsupported_subclass" and s.module_type == "MoreThanTimm(BatchNorm2d)" and not s.foldable


def test_bn1d_input_rank_from_example_inputs():
    model, inputs = S.mlp_bn1d_3d()
    rep = audit(model, inputs)
    s = rep.site("bn")
    assert s.input_shapes == [[4, 8, 8]]
    assert not s.foldable and s.reason
    model, inputs = S.mlp_bn1d()
    rep = audit(model, inputs)
    assert rep.site("bn1").input_shapes == [[4, 16]]
    assert rep.site("bn1").producer["op"] == "linear"


def test_flag_details():
    rep = audit(*S.tiny_var())
    (w,) = rep.site("bn1").warnings
    assert "running_var[1]" in w and "31.62" in w  # 1/sqrt(1e-14 + 1e-3)
    rep = audit(*S.nan_stats())
    assert "running_var has 1 NaN" in rep.site("bn1").warnings[0]
    assert "weight has 1 Inf" in rep.site("bn2").warnings[0]
    assert not rep.site("bn1").foldable
    rep = audit(*S.untrained_stats())
    assert "num_batches_tracked == 0" in rep.site("bn1").warnings[0]
    assert rep.site("bn2").running_stats is False
    assert rep.summary()["warnings"] == 2
    assert rep.summary_text() == "2 norm sites (bn 2), 1 foldable, 2 warnings"


def test_train_mode_model_is_not_modified():
    model, inputs = S.train_mode()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = audit(model, inputs)
    assert all(s.mode == "train" and not s.foldable for s in rep.sites)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_untraceable_model_is_fully_audited():
    model, inputs = S.untraceable()
    rep = audit(model)
    assert rep.untraced == ["block"]
    assert rep.site("block.bn").graph is False and rep.site("block.bn").region == "block"
    assert rep.site("head_bn").graph and rep.site("head_bn").foldable
    assert any("block" in n and "without a graph" in n for n in rep.notes)
    assert rep.summary()["untraced"] == ["block"]
    assert rep.summary_text().endswith("1 part without graph")


def test_functional_sites():
    rep = audit(*S.functional_norms())
    for s in rep.sites:
        assert s.functional
    bn = rep.site("batch_norm")
    assert bn.mode == "eval" and bn.eps == 1e-5 and bn.producer["name"] == "conv"
    assert rep.site("layer_norm").shape == {"normalized_shape": [8]}
    assert rep.site("rms_norm").eps == 1e-6

    class TrainFn(nn.Module):
        def forward(self, x):
            return F.batch_norm(x, None, None, training=True)

    rep = audit(TrainFn())
    assert set(rep.site("batch_norm").flags) == {"train_mode", "no_running_stats"}


def test_weight_reparam_sites():
    rep = audit(*S.gan_discriminator())
    s = rep.site("conv1.weight")
    assert s.module_type == "Conv2d (hook)" and s.producer["name"] == "conv1"
    assert rep.site("conv2.weight").module_type == "Conv2d (parametrization)"
    assert rep.site("fc.weight").producer["op"] == "linear"
    model, inputs = S.gan_discriminator()
    model.train()
    rep = audit(model)
    assert all("train_mode" in s.flags for s in rep.sites)


def test_loaded_model_wrapper():
    class Loaded:
        def __init__(self, m):
            self.module = m
            self.format = "pickle"
            self.path = "x.pt"
            self.notes = []

    model, _ = S.mobilenet_style()
    rep = audit(Loaded(model))
    assert rep.model == "x.pt" and len(rep.sites) == 3


def test_torchscript_audit():
    model, inputs = S.SmallCNN().eval(), (torch.randn(2, 3, 8, 8),)
    S.randomize_norm_stats(model)

    class WithFn(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return F.layer_norm(self.body(x), (2,))

    sm = torch.jit.script(WithFn().eval())
    rep = audit(sm)
    assert rep.source == "torchscript"
    kinds = {s.name: s.kind for s in rep.sites}
    assert kinds == {"body.bn1": "bn", "body.bn2": "bn", "layer_norm": "ln"}
    s = rep.site("body.bn2")
    assert s.producer["name"] == "body.conv2" and s.producer["op"] == "conv"
    assert s.mode == "eval" and s.eps == 1e-5 and s.foldable
    assert rep.site("layer_norm").functional
    json.dumps(rep.to_dict())
    traced = torch.jit.trace(model, inputs)
    rep = audit(traced)
    assert {s.name for s in rep.sites} == {"bn1", "bn2"}


def test_exported_program_audit():
    model, inputs = S.SmallCNN().eval(), (torch.randn(2, 3, 8, 8),)
    S.randomize_norm_stats(model)

    class WithFn(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return F.layer_norm(self.body(x), (2,))

    ep = torch.export.export(WithFn().eval(), inputs)
    rep = audit(ep)
    assert rep.source == "export"
    kinds = {s.name: (s.kind, s.functional) for s in rep.sites}
    assert kinds["body.bn1"] == ("bn", False) and kinds["body.bn2"] == ("bn", False)
    fn = [n for n, (k, f) in kinds.items() if f]
    assert len(fn) == 1 and kinds[fn[0]][0] == "ln"
    s = rep.site("body.bn1")
    assert s.producer["op"] == "conv" and s.producer["name"] == "body.conv1"
    assert s.shape.get("num_features") == 6
    json.dumps(rep.to_dict())


def test_json_report_shape():
    rep = audit(*S.untraceable())
    d = json.loads(json.dumps(rep.to_dict()))
    assert set(d) >= {"model", "sites", "summary"}
    for s in d["sites"]:
        assert set(s) >= {"name", "kind", "module_type", "mode", "producer", "foldable", "reason", "flags"}
    assert d["summary"]["sites"] == 3 and d["summary"]["kinds"] == {"bn": 3}


def test_resnet50_like_is_fast():
    model, inputs = S.resnet50_like(width=4, spatial=16)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 53
    t0 = time.perf_counter()
    rep = audit(model)
    assert time.perf_counter() - t0 < 3.0
    assert len(rep.sites) == 53 and rep.summary()["foldable"] == 53


def test_cli_audit(tmp_path):
    from click.testing import CliRunner

    from normswap_cli.main import cli

    model, _ = S.untraceable()
    path = tmp_path / "m.pt"
    torch.save(model, path)
    out = tmp_path / "a.json"
    res = CliRunner().invoke(cli, ["audit", str(path), "--trust", "--import", "samples.models",
                                   "--input-shape", "2,3,8,8", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "PASSED | normswap audit | 3 norm sites (bn 3), 2 foldable" in res.output
    assert "block" in res.output
    d = json.loads(out.read_text())
    assert [s["name"] for s in d["sites"]] == ["stem.1", "block.bn", "head_bn"]


def test_torchscript_submodule_of_eager_model():
    inner = S.SmallCNN().eval()
    S.randomize_norm_stats(inner)

    class W(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.jit.script(inner)
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x):
            return self.bn(self.a(x))

    rep = audit(W().eval())
    assert {s.name for s in rep.sites} == {"bn", "a.bn1", "a.bn2"}
    assert rep.site("a.bn1").producer["name"] == "a.conv1"
    assert not rep.site("a.bn1").foldable and "TorchScript" in rep.site("a.bn1").reason
    assert rep.site("bn").producer["name"] == "a"


def test_lazy_modules_are_not_materialised():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    rep = audit(model, (torch.randn(2, 3, 8, 8),))
    assert type(model[1]) is nn.LazyBatchNorm2d
    assert rep.site("1").module_type == "LazyBatchNorm2d"
    json.dumps(rep.to_dict())


def test_exported_program_lowered_module_norms():
    model, inputs = S.llama_block()
    rep = audit(torch.export.export(model, inputs))
    assert {s.name: s.kind for s in rep.sites} == EXPECTED["llama_block"]
    model, inputs = S.frozen_bn()
    rep = audit(torch.export.export(model, inputs))
    assert {s.name: s.kind for s in rep.sites} == {"1": "frozen_bn"}
    model, inputs = S.timm_bnact()
    rep = audit(torch.export.export(model, inputs))
    assert {s.name: s.kind for s in rep.sites} == EXPECTED["timm_bnact"]


def test_unused_norm_is_reported_not_as_untraced():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.spare = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    rep = audit(M().eval())
    s = rep.site("spare")
    assert s.graph and s.calls == 0 and "no_graph" not in s.flags
    assert rep.untraced == []


# --------------------------------------------------------------------------- QA regressions


def test_traced_torchscript_eps_and_running_stats_from_graph():
    """A traced module keeps no eps / track_running_stats attributes: they come from its graph."""
    for name in ("tiny_var", "untrained_stats"):
        model, x = ALL_SAMPLES[name]()
        eager = {s.name: s for s in audit(model, x).sites}
        script = {s.name: s for s in audit(torch.jit.trace(model, x)).sites}
        for n, s in eager.items():
            t = script[n]
            assert t.eps == pytest.approx(s.eps), n
            assert t.running_stats == s.running_stats, n
            assert sorted(t.flags) == sorted(s.flags), n
            if not s.foldable and "track_running_stats" in (s.reason or ""):
                assert not t.foldable, n
    # the tiny-variance warning quotes the real fold scale (eps 1e-3), not 1/sqrt(1e-14)
    model, x = ALL_SAMPLES["tiny_var"]()
    w = [s for s in audit(torch.jit.trace(model, x)).sites if "tiny_var" in s.flags][0].warnings[0]
    assert "= 31.62" in w


def test_example_inputs_that_do_not_run_do_not_reach_the_planner():
    model, _ = ALL_SAMPLES["resnet_style"]()
    rep = audit(model, torch.randn(1, 5, 8, 8))  # wrong channel count
    assert any(n.startswith("forward on example inputs failed") for n in rep.notes)
    assert "fold.plan failed" not in rep.fold_planner
    assert rep.summary()["foldable"] == audit(model).summary()["foldable"]


def test_export_program_bn_without_running_stats_is_not_called_train_mode():
    model, x = ALL_SAMPLES["untrained_stats"]()  # eval model; bn2 has track_running_stats=False
    site = {s.name: s for s in audit(torch.export.export(model, x)).sites}["bn2"]
    assert site.mode != "train" and "train_mode" not in site.flags
    assert "no_running_stats" in site.flags and not site.foldable


@pytest.mark.parametrize("name", ["gan_discriminator", "weight_norm_net"])
def test_spectral_and_weight_norm_found_in_torchscript_and_export(name):
    model, x = ALL_SAMPLES[name]()
    want = {n: k for n, k in EXPECTED[name].items()}
    for compiled in (torch.jit.trace(model, x, check_trace=False), torch.export.export(model, x)):
        sites = {s.name: s.kind for s in audit(compiled).sites}
        assert sites == want, type(compiled).__name__
