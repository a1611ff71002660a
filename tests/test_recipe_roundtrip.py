"""Converted / folded models saved as state dicts reload exactly with the same --arch.

Without the recipe the factory's model would load these files with a few keys
"unexpected" and compute something else (GroupNorm's group count is not in a state
dict; a fold's new conv bias would be dropped)."""

from pathlib import Path

import pytest
import torch

from normswap.io import load_model

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "samples" / "digits"


@pytest.fixture(scope="module")
def calib():
    from samples.digits import load_split

    x, _ = load_split("calib")
    return x[:64]


@pytest.mark.parametrize("to", ["gn", "frn", "affine"])
def test_convert_state_dict_reloads_exactly(tmp_path, calib, to):
    from normswap.convert.pipeline import convert_file

    out = tmp_path / f"digits.{to}.pt"
    converted, report = convert_file(
        DIGITS / "digits_resnet.pt", to, calib=calib, arch="samples.digits:digits_resnet",
        output=out, export_onnx=False, mode="fast",
    )
    back = load_model(out, arch="samples.digits:digits_resnet")
    assert any("recipe" in n for n in back.notes)
    assert not any("keys" in n for n in back.notes), back.notes
    with torch.no_grad():
        assert torch.equal(back.module.eval()(calib), converted.eval()(calib))


def test_fold_state_dict_reloads_exactly(tmp_path, calib):
    from normswap.fold.pipeline import fold_file

    out = tmp_path / "digits.folded.pt"
    fold_file(str(DIGITS / "digits_resnet.pt"), output=str(out), arch="samples.digits:digits_resnet")
    original = load_model(DIGITS / "digits_resnet.pt", arch="samples.digits:digits_resnet").module
    back = load_model(out, arch="samples.digits:digits_resnet")
    assert isinstance(back.module.stem.bn, torch.nn.Identity) and back.module.stem.conv.bias is not None
    assert not any(m.training for m in back.module.modules())  # rebuilt modules keep the eval mode
    assert not any("keys" in n for n in back.notes), back.notes
    with torch.no_grad():
        y, yf = original(calib), back.module(calib)
    assert (yf - y).abs().max() <= 1e-5 * (1 + y.abs().max())
