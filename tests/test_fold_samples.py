"""Every sample model folded: same outputs, a report consistent with plan(); the trained
digits model keeps its exact test accuracy."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from normswap.fold import fold, plan
from normswap.norms import iter_norms
from samples.models import ALL_SAMPLES

torch.set_num_threads(1)


def _out(model, inputs):
    with torch.no_grad():
        y = model(*copy.deepcopy(inputs))
    return y[0] if isinstance(y, (tuple, list)) else y


@pytest.mark.parametrize("name", sorted(ALL_SAMPLES))
def test_sample_folded(name):
    model, inputs = ALL_SAMPLES[name]()
    ref_model = copy.deepcopy(model) if any(m.training for m in model.modules()) else model
    y = _out(ref_model, inputs)
    decisions = plan(model, example_inputs=inputs)
    folded, rep = fold(model, inputs)
    yf = _out(folded, inputs)
    assert yf.shape == y.shape
    fin = torch.isfinite(y)
    assert torch.equal(fin, torch.isfinite(yf))
    y, yf = y[fin], yf[fin]
    if y.numel():
        assert float((yf - y).abs().max()) <= 1e-5 * (1 + float(y.abs().max())), rep.to_dict()
        assert rep.passed
    else:  # outputs all NaN/Inf (the nan_stats sample): nothing was compared, so nothing is proven
        assert not rep.passed and rep.verification["reason"] == "no finite values to compare"
    d = rep.to_dict()
    assert set(d) >= {"folded", "skipped", "summary"}
    # the report lists every norm (folded or skipped, with a reason), consistent with plan()
    got = {f["norm"]: ("folded", f["into"], f["pattern"]) for f in d["folded"]}
    got.update({s["norm"]: ("skipped", s["reason"]) for s in d["skipped"]})
    want = {p.norm: (("folded", p.into, p.pattern) if p.reason is None else ("skipped", p.reason))
            for p in decisions}
    assert got == want
    names = {n for n, _, _ in iter_norms(model)}
    assert names <= set(got)
    assert all(s["reason"] for s in d["skipped"])
    # folded norms are nn.Identity in the folded model (module norms that were removed)
    for f in d["folded"]:
        if f["pattern"] in ("conv_bn", "convtranspose_bn", "linear_bn", "bn_next"):
            kept = folded.get_submodule(f["norm"])  # what a norm with post ops (bn_act) keeps
            assert isinstance(kept, nn.Identity) or type(kept).__name__ == "PostOps"
        if f["pattern"] == "composite_bn":
            assert isinstance(folded.get_submodule(f["norm"] + ".bn"), nn.Identity)


def test_expected_folds_on_key_samples():
    expect = {
        "resnet_style": (9, 0),
        "mobilenet_style": (3, 0),
        "convtranspose_decoder": (2, 0),
        "mlp_bn1d": (2, 0),
        "shared_pair": (1, 0),
        "shared_producer": (0, 2),
        "mlp_bn1d_3d": (0, 1),
        "train_mode": (0, 5),
        "nan_stats": (0, 2),
    }
    for name, (nf, ns) in expect.items():
        model, inputs = ALL_SAMPLES[name]()
        _, rep = fold(model, inputs)
        assert (len(rep.folded), len(rep.skipped)) == (nf, ns), (name, rep.to_dict())


def test_functional_sample_returns_graph_module():
    model, inputs = ALL_SAMPLES["functional_norms"]()
    folded, rep = fold(model, inputs)
    assert isinstance(folded, torch.fx.GraphModule) and rep.returns_graph_module
    assert any("GraphModule" in n for n in rep.notes)


DIGITS = Path(__file__).resolve().parents[1] / "samples" / "digits"


def test_digits_model_same_accuracy():
    assert (DIGITS / "digits_resnet.pt").exists() and (DIGITS / "test.npz").exists()
    from samples.digits import load_split, load_trained

    model = load_trained("bn")
    x, y = load_split("test")
    with torch.no_grad():
        logits = model(x)
    folded, rep = fold(model, (x[:8],))
    assert len(rep.folded) == 11 and not rep.skipped
    assert isinstance(folded.layer1[0].bn1, nn.Identity)
    with torch.no_grad():
        logits_f = folded(x)
    acc = (logits.argmax(1) == y).float().mean().item()
    acc_f = (logits_f.argmax(1) == y).float().mean().item()
    assert acc_f == acc and acc > 0.9
    assert (logits_f - logits).abs().max() <= 1e-4 * (1 + logits.abs().max())
    assert torch.equal(logits_f.argmax(1), logits.argmax(1))


def test_digits_pickled_module_via_cli(tmp_path):
    from click.testing import CliRunner

    from normswap_cli.main import cli
    from samples.digits import load_split

    out = tmp_path / "digits.folded.pt"
    r = CliRunner().invoke(cli, ["fold", str(DIGITS / "digits_resnet_module.pt"), "--trust", "--import",
                                 "samples.digits", "-o", str(out), "--data", str(DIGITS / "test.npz")])
    assert r.exit_code == 0, r.output
    assert "folded 11 of 11" in r.output
    folded = torch.load(out, weights_only=False)
    x, y = load_split("test")
    with torch.no_grad():
        acc = (folded(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9
