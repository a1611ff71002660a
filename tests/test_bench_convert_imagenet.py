"""The ImageNet conversion benchmark's two-split pooling (benchmarks/convert_imagenet.py): every photo
held out once, figures weighted by held-out photos, an error row never pooled."""

import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "convert_imagenet.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_convert_imagenet", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(split, held, agree, acc_o, acc_c, kl=0.5, top5=0.7, cal=5.0, allx=4.0, mb=600.0):
    return {"model": "lite1", "method": "sequential", "split": split, "held_out": held, "agreement": agree,
            "top5": top5, "kl": kl, "acc_original": acc_o, "acc_converted": acc_c,
            "drop": None if acc_c is None else acc_o - acc_c,
            "calib_x_forward": cal, "x_forward": allx, "peak_mb": mb}


def test_pool_weights_by_held_out_photos(bench):
    a = _row("a", 244, 0.80, 0.90, 0.75, kl=0.6, cal=6.0, mb=700.0)
    b = _row("b", 256, 0.90, 0.88, 0.85, kl=0.4, cal=4.0, mb=650.0)
    p = bench.pool([a, b])
    assert p["split"] == "a+b" and p["held_out"] == 500
    assert math.isclose(p["agreement"], (0.80 * 244 + 0.90 * 256) / 500)
    assert math.isclose(p["kl"], (0.6 * 244 + 0.4 * 256) / 500)
    assert math.isclose(p["drop"], p["acc_original"] - p["acc_converted"])
    assert math.isclose(p["calib_x_forward"], 5.0) and p["peak_mb"] == 700.0
    assert math.isclose(p["agreement_se"], math.sqrt(p["agreement"] * (1 - p["agreement"]) / 500))
    line = bench.table([p]).splitlines()[-1]
    assert line.split()[:3] == ["lite1", "a+b", "sequential"] and f"{100 * p['agreement']:.1f}" in line


def test_pool_needs_two_good_splits(bench):
    a = _row("a", 244, 0.8, 0.9, 0.75)
    err = {"model": "lite1", "method": "sequential", "split": "b", "error": "boom"}
    assert bench.pool([a, err]) is None and bench.pool([a]) is None
    assert "error: boom" in bench.table([err])


def test_unlabelled_accuracy_stays_empty(bench):
    a, b = _row("a", 10, 0.5, None, None), _row("b", 10, 0.7, None, None)
    p = bench.pool([a, b])
    assert p["acc_converted"] is None and p["drop"] is None and math.isclose(p["agreement"], 0.6)


def test_mcnemar_exact_p_values(bench):
    assert bench.mcnemar_p(0, 0) == 1.0 and bench.mcnemar_p(3, 3) == 1.0
    assert math.isclose(bench.mcnemar_p(0, 5), 2 / 32)  # all five discordant photos one way
    assert math.isclose(bench.mcnemar_p(2, 8), 2 * (1 + 10 + 45) / 1024)
    assert bench.mcnemar_p(1, 30) < 1e-6 and bench.mcnemar_p(30, 1) == bench.mcnemar_p(1, 30)


def _photos(split, files, labels, orig, conv, method):
    return {"model": "lite1", "method": method, "split": split, "held_out": len(files),
            "photos": {"file": files, "label": labels, "original": orig, "converted": conv}}


def test_paired_counts_discordant_photos_per_split(bench):
    # split a: photos p1..p3; split b: the same file names held out from another calibration
    rows = [
        _photos("a", ["p1", "p2", "p3"], [1, 2, 3], [1, 2, 9], [1, 5, 9], "fast"),
        _photos("a", ["p3", "p1", "p2"], [3, 1, 2], [9, 1, 2], [3, 1, 2], "fit"),  # another order
        _photos("b", ["p1"], [1], [1], [7], "fast"),
        _photos("b", ["p1"], [1], [1], [1], "fit"),
    ]
    (pr,) = bench.paired(rows)
    assert (pr["first"], pr["second"], pr["photos"]) == ("fast", "fit", 4)
    # agreement: fast keeps a/p1, a/p3; fit keeps a/p1, a/p2, b/p1 -> only fit: a/p2, b/p1; only fast: a/p3
    assert (pr["agree"]["only_first"], pr["agree"]["only_second"]) == (1, 2)
    # correct: fast right on a/p1; fit right on a/p1, a/p2, a/p3, b/p1
    assert (pr["correct"]["only_first"], pr["correct"]["only_second"]) == (0, 3)
    assert math.isclose(pr["correct"]["p"], 2 / 8)
    assert "fast vs fit" in bench.paired_table([pr])


def test_paired_adds_a_row_over_the_networks(bench):
    rows = []
    for model, conv in (("lite0", [1, 9]), ("lite1", [9, 9])):
        for method, c in (("fast", conv), ("fit", [1, 2])):
            r = _photos("a", ["p1", "p2"], [1, 2], [1, 2], c if method == "fast" else [1, 2], method)
            r["model"] = model
            rows.append(r)
    prs = bench.paired(rows)
    assert [r["model"] for r in prs] == ["lite0", "lite1", "all"]
    assert prs[-1]["photos"] == 4 and (prs[-1]["agree"]["only_first"], prs[-1]["agree"]["only_second"]) == (0, 3)
    assert max(len(ln) for ln in bench.paired_table(prs).splitlines()) <= 80


def test_mcnemar_does_not_overflow_on_a_large_folder(bench):
    assert bench.mcnemar_p(600, 600) == 1.0 and 0.09 < bench.mcnemar_p(400, 450) < 0.095
    assert 0 < bench.mcnemar_p(2000, 2300) < 1e-5


def test_per_photo_names_are_paths_below_the_data_folder(bench, tmp_path):
    """Class folders may hold files of the same name: each photo keeps its own key."""
    import torch
    from PIL import Image

    from normswap.images import open_image_folder

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / cls / "001.png")
    held = open_image_folder(tmp_path, "none", input_shape=(1, 3, 8, 8))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4)).eval()
    conv = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4)).eval()
    fid, ph = bench._held_out(conv, model, held, 1)  # the predictions come from fidelity's own passes
    assert ph["file"] == ["cat/001.png", "dog/001.png"] and ph["label"] == [0, 1]
    with torch.no_grad():
        x = next(held.batches(2))[0]
        assert ph["original"] == model(x).argmax(1).tolist() and ph["converted"] == conv(x).argmax(1).tolist()
    assert fid.top1_agreement == sum(o == c for o, c in zip(ph["original"], ph["converted"])) / 2
    assert not model._forward_hooks and not conv._forward_hooks  # removed again
    row = {"model": "m", "split": "a", "photos": ph}
    (pr,) = bench.paired([dict(row, method="fast"), dict(row, method="fit")])
    assert pr["photos"] == 2


def _variants():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "repair_variants.py"
    spec = importlib.util.spec_from_file_location("_repair_variants", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_repair_variants_pair_photos_and_every_variant_is_a_repair_option(bench):
    from normswap.convert.repair import RepairOptions

    rv = _variants()
    files = ["p1.jpg", "p2.jpg", "p3.jpg", "p4.jpg"]
    base = {"file": files, "original": [1, 2, 3, 4], "label": [1, 2, 0, 4], "converted": [1, 2, 3, 0]}
    row = {"variant": "default", "photos": {"file": files, "original": [1, 2, 3, 4], "label": [1, 2, 0, 4],
                                            "converted": [1, 0, 0, 4]}}
    p = rv.paired_with_calibration(base, row, "lite1", "a")
    assert p["first"] == "calibration" and p["second"] == "default" and p["photos"] == 4
    # keeps the original's top-1: calibration alone on photos 2 and 3, repair on photo 4
    assert p["agree"] == {"only_first": 2, "only_second": 1, "p": 1.0}
    # right: calibration alone on photo 2 only; repair on photos 3 and 4
    assert p["correct"]["only_first"] == 1 and p["correct"]["only_second"] == 2
    assert bench.mcnemar_p(0, 6) == pytest.approx(2 / 64) and bench.mcnemar_p(0, 0) == 1.0
    assert bench.mcnemar_p(12, 20) == pytest.approx(0.215, abs=1e-3)  # the README's Lite0 figure
    for name, kw in rv.VARIANTS.items():
        RepairOptions(**kw)
    assert rv.VARIANTS["default"] == {} and rv.main(["--list"]) == 0
