"""Differential test: ``audit(x)`` reports exactly what ``fold(x)`` does, for every model of the
samples zoo in all three front ends -- one planner on one graph view per front end.

* eager: the audit's verdicts (with the example inputs) are the fold report's rows, site by site
  (foldable <=> folded, the same layers, the same reason and code);
* torch.export: the same, for the program ``fold`` rewrites;
* TorchScript: nothing rewrites TorchScript (``fold`` refuses it and names the eager model), so the
  audit's verdicts are ``plan``'s on the same TorchScript graph ("this graph proves the fold
  exact"; a trace may prove what the eager model's untraceable code hides, e.g. the
  ``untraceable`` sample).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import normswap
from normswap.errors import NormswapError
from normswap.fold import plan
from tests import golden_zoo as Z

ZOO = Z.zoo()


def _audit_rows(rep, skip_codes=("torchscript_submodule",)):
    out = {}
    for s in rep.sites:
        if s.reason_code in skip_codes:
            continue
        out[s.name] = (s.foldable, s.fold_into if s.foldable else None, None if s.foldable else s.reason,
                       s.reason_code)
    return out


def _fold_rows(frep):
    out = {f["norm"]: (True, f["into"], None, None) for f in frep.folded}
    out.update({s["norm"]: (False, None, s["reason"], s["code"]) for s in frep.skipped})
    return out


@pytest.mark.parametrize("name", sorted(ZOO))
def test_audit_is_fold_on_every_front_end(name):
    torch.manual_seed(0)
    model, inputs = ZOO[name]()
    fronts = dict(Z.front_ends(model, inputs))
    # eager
    arep = normswap.audit(model, inputs)
    _, frep = normswap.fold(copy.deepcopy(model), inputs)
    assert _audit_rows(arep) == _fold_rows(frep)
    eager_folded = {f["norm"]: f["into"] for f in frep.folded}
    # torch.export
    ep = fronts["export"]
    if not isinstance(ep, str):
        arep = normswap.audit(ep)
        _, frep = normswap.fold(ep, inputs)
        assert frep.verification is None or frep.verification["ok"]
        assert _audit_rows(arep) == _fold_rows(frep)
    # TorchScript
    ts = fronts["torchscript"]
    if not isinstance(ts, str):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arep = normswap.audit(ts)
            rows = {d.norm: (d.reason is None, d.into, d.reason, d.code) for d in plan(ts)}
        assert {n: (v[0], v[1], v[2], v[3]) for n, v in _audit_rows(arep).items()} == \
            {n: (f, i if f else None, r, c) for n, (f, i, r, c) in rows.items()}
        with pytest.raises(NormswapError, match="TorchScript"):
            normswap.fold(ts, inputs)
        traced = {n for n, v in rows.items() if v[0]} - set(eager_folded)
        assert name == "untraceable" or not traced, traced  # the trace sees through the data-dependent branch


def test_every_skip_reason_has_a_catalogue_code():
    from normswap.reasons import CATALOGUE

    model, inputs = ZOO["resnet_style"]()
    model.train()
    _, frep = normswap.fold(model, inputs)
    assert frep.skipped and all(s["code"] in CATALOGUE for s in frep.skipped)
    for name in ("untraceable", "shared_pair", "mlp_bn1d_3d", "nan_stats", "lrn_net"):
        m, x = ZOO[name]()
        _, frep = normswap.fold(m, x)
        assert all(s["code"] in CATALOGUE for s in frep.skipped), frep.skipped
