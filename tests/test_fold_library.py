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
