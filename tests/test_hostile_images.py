"""Regressions from a hostile pass over image folders and data (real files, real processes):
an output named inside an input image folder is refused even with --force; a leading number
too large for a class index, a sub-folder that holds no image (a symbolic link back to the
folder, a folder named like an image) and labels on only some file names no longer lose or
break labels silently; an image so elongated that its resize would need gigabytes is a bad
image (skippable), and a crop fraction that implies a huge resize names the option; a failed
run's stderr is exactly one line and a file name with a newline is shown escaped; one-hot
labels, batches of different shapes and pickled objects in a data file are one-line errors;
image options without an image folder are refused."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from normswap.errors import NormswapError
from normswap.images import open_image_folder
from normswap.preprocess import Preprocess

Image = pytest.importorskip("PIL.Image")

ROOT = Path(__file__).resolve().parents[1]
DIGITS = [ROOT / "samples" / "digits" / "digits_resnet.pt", "--arch", "samples.digits:digits_resnet"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="80", OMP_NUM_THREADS="1")


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "normswap_cli.main", *map(str, args)], cwd=str(cwd), env=ENV,
                          capture_output=True, text=True, timeout=300)


def _one_line_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout[-1500:], p.stderr[-1500:])
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), repr(p.stderr)  # no blank line either
    for n in needles:
        assert n in p.stderr, p.stderr
    return p.stderr


def _png(path: Path, h: int = 32, w: int = 32, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)).save(path)
    return path


def _sha(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _open(folder: Path, **opts):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = open_image_folder(folder, Preprocess.from_options("none", image_size=16, **opts))
    return ds, [str(w.message) for w in caught]


# ------------------------------------------------------------------------------ outputs


def test_an_output_inside_the_calib_image_folder_is_refused_even_with_force(tmp_path):
    imgs = tmp_path / "imgs"
    for i in range(4):
        _png(imgs / f"{i % 2:04d}_{i}.png", seed=i)
    before = _sha(imgs)
    common = ["--force", "convert", *DIGITS, "--to", "gn", "--calib", imgs, "--preprocess", "none",
              "--image-size", "32", "--no-onnx"]
    for opt, out in (("-o", imgs / "0000_0.png"), ("--report", imgs / "new.png")):
        extra = ["-o", out] if opt == "-o" else ["-o", tmp_path / "m.pt", "--report", out]
        _one_line_error(_cli(*common, *extra, cwd=tmp_path), f"{opt} {out} would be an image inside {imgs}",
                        "--calib data")
    assert _sha(imgs) == before and not (tmp_path / "m.pt").exists()


# ------------------------------------------------------------------------------ labels


def test_a_leading_number_too_large_for_a_class_index_reads_unlabelled_and_says_so(tmp_path):
    _png(tmp_path / "0001_a.png")
    _png(tmp_path / "99999999999999999999_b.png", seed=1)  # does not fit an int64
    ds, said = _open(tmp_path)
    assert ds.labels is None and len(ds) == 2
    assert any("without labels" in w and "too large for a class index" in w for w in said), said
    assert next(ds.batches(2))[0].shape == (2, 3, 16, 16)


def test_sub_folders_without_images_keep_a_flat_folders_labels(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i:04d}_{i}.png", seed=i)
    os.symlink(".", tmp_path / "loop")  # a symbolic link back to the folder
    (tmp_path / "0009_dir.jpg").mkdir()  # a folder named like an image
    (tmp_path / "empty").mkdir()
    ds, said = _open(tmp_path)
    assert ds.labels.tolist() == [0, 1, 2] and ds.to_dict()["layout"] == "flat" and not said
    _png(tmp_path / "empty" / "0004_x.png")  # now images in the folder and in a sub-folder
    ds, said = _open(tmp_path)
    assert ds.labels is None and ds.to_dict()["layout"] == "mixed"
    assert any("without labels (images both in the folder (3) and in 1 sub-folder(s) (1))" in w for w in said), said


def test_only_ascii_digits_make_a_class_index(tmp_path):
    _png(tmp_path / "\u0663_x.png")  # ARABIC-INDIC DIGIT THREE: not a class index
    _png(tmp_path / "0003_y.png", seed=1)
    ds, said = _open(tmp_path)
    assert ds.labels is None and any("only 1 of 2" in w for w in said), said


def test_labels_on_only_some_file_names_warn(tmp_path):
    _png(tmp_path / "0001_a.png")
    _png(tmp_path / "holiday.png", seed=1)
    ds, said = _open(tmp_path)
    assert ds.labels is None and any("only 1 of 2 file names start with a class index" in w for w in said), said
    (tmp_path / "0001_a.png").rename(tmp_path / "cat.png")  # no index at all: plain unlabelled, no warning
    ds, said = _open(tmp_path)
    assert ds.labels is None and not said


def test_an_eval_folder_that_loses_its_labels_is_warned_in_the_report(tmp_path):
    cal, ev = tmp_path / "cal", tmp_path / "ev"
    for i in range(6):
        _png(cal / f"{i:04d}_{i}.png", seed=i)
        _png(ev / (f"{i:04d}_{i}.png" if i else "photo.png"), seed=10 + i)
    p = _cli("convert", *DIGITS, "--to", "gn", "--calib", cal, "--eval", ev, "--preprocess", "none",
             "--image-size", "32", "--no-onnx", "-o", tmp_path / "m.pt", "--json", tmp_path / "r.json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fidelity_eval"]["accuracy_original"] is None
    assert any(f"image folder {ev} is read without labels (only 5 of 6" in w for w in report["warnings"])


# ------------------------------------------------------------------------------ sizes


def test_an_image_whose_resize_would_need_gigabytes_is_a_bad_image(tmp_path):
    _png(tmp_path / "0000_ok.png")
    Image.fromarray(np.zeros((8000, 1), np.uint8)).save(tmp_path / "0001_strip.png")  # 93 bytes
    spec = dict(image_size=224)
    with pytest.raises(NormswapError, match=r"0001_strip.png: cannot read image \(1x8000 pixels: the resize before "
                                            r"the crop would make it 256x2048000, more than 16777216 pixels\); pass "
                                            r"--skip-bad-images"):
        open_image_folder(tmp_path, Preprocess.from_options("imagenet", **spec))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = open_image_folder(tmp_path, Preprocess.from_options("imagenet", skip_bad_images=True, **spec))
    assert [p.name for p in ds.files] == ["0000_ok.png"] and len(ds.skipped) == 1
    assert next(ds.batches(4))[0].shape == (1, 3, 224, 224)


@pytest.mark.parametrize("pct", ["1e-9", "0.001"])
def test_a_crop_fraction_implying_a_huge_resize_names_the_option(tmp_path, pct):
    _png(tmp_path / "0000_a.png")
    with pytest.raises(NormswapError, match=rf"--crop-pct {float(pct):g}: the resize before the crop would be \d+ "
                                            r"pixels, more than 16384"):
        open_image_folder(tmp_path, Preprocess.from_options("imagenet", image_size=32, crop_pct=pct))


# ------------------------------------------------------------------------------ messages


def test_a_failed_run_after_progress_is_one_line_and_names_are_escaped(tmp_path):
    cal, ev = tmp_path / "cal", tmp_path / "ev"
    for i in range(4):
        _png(cal / f"{i:04d}_{i}.png", seed=i)
        _png(ev / f"{i:04d}_{i}.png", seed=10 + i)
    bad = ev / "0005_bad\nname.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # not a readable PNG, its name holds a newline
    p = _cli("convert", *DIGITS, "--to", "gn", "--calib", cal, "--eval", ev, "--preprocess", "none",
             "--image-size", "32", "--no-onnx", "-o", tmp_path / "m.pt", cwd=tmp_path)
    _one_line_error(p, repr(str(bad)), "cannot read image")
    assert not (tmp_path / "m.pt").exists()


def test_one_hot_labels_mixed_batches_and_pickled_data_are_one_line_errors(tmp_path):
    import normswap
    from samples.digits import digits_resnet

    m = digits_resnet().eval()
    x, y = torch.randn(8, 1, 32, 32), torch.arange(8) % 10
    with pytest.raises(NormswapError, match=r"labels shaped \(8, 10\); expected one class index per sample"):
        normswap.convert(m, "gn", calib=x, eval_data=(x, torch.nn.functional.one_hot(y, 10)))
    with pytest.raises(NormswapError, match=r"batch 1 holds samples shaped \(1, 16, 16\).*same sample shape"):
        normswap.convert(m, "gn", calib=[torch.randn(4, 1, 32, 32), torch.randn(4, 1, 16, 16)])
    with pytest.raises(NormswapError, match=r"batch 1 holds samples shaped \(1, 32, 32\) \(torch.uint8\)"):
        normswap.convert(m, "gn", calib=[torch.rand(4, 1, 32, 32), torch.zeros(4, 1, 32, 32, dtype=torch.uint8)])
    np.savez(tmp_path / "onehot.npz", x=x.numpy(), y=np.eye(10)[y.numpy()])
    torch.save({"x": x, "meta": Path("x")}, tmp_path / "obj.pt")  # a pickled object beside the tensor
    for f, needle in (("onehot.npz", "labels shaped (8, 10)"), ("obj.pt", "holds pickled Python objects")):
        _one_line_error(_cli("convert", *DIGITS, "--to", "gn", "--calib", tmp_path / f, "--no-onnx",
                             "-o", tmp_path / "m.pt", cwd=tmp_path), needle)
    assert m.training is False and not (tmp_path / "m.pt").exists()


def test_image_options_without_an_image_folder_are_refused(tmp_path):
    calib = ROOT / "samples" / "digits" / "calib.npz"
    _one_line_error(_cli("convert", *DIGITS, "--to", "gn", "--calib", calib, "--preprocess", "imagenet",
                         "--no-onnx", "-o", tmp_path / "m.pt", cwd=tmp_path),
                    "--preprocess reads image folders, and this run has none (--calib")
    _one_line_error(_cli("audit", *DIGITS, "--image-size", "32", cwd=tmp_path), "(no data option)")


# ------------------------------------------------------------------------------ review follow-ups


def test_large_sizes_the_options_ask_for_still_read_every_photo(tmp_path):
    for kw in (dict(preprocess="none", image_size=4100), dict(preprocess="imagenet", image_size=224, crop_pct=0.05),
               dict(preprocess="imagenet", image_size=224, resize=5000),
               dict(preprocess="imagenet", image_size="224,448")):
        t = Preprocess.from_options(**kw).resolve(None, None, source="x")
        assert t.check_size(32, 32) is None and t.check_size(4000, 3000) is None, kw
    t = Preprocess.from_options("imagenet", image_size=224, resize=5000).resolve(None, None, source="x")
    assert "more than 100000000 pixels" in t.check_size(1, 8000)  # 4x what the options ask for


def test_float_batches_of_two_precisions_and_two_feature_batches_still_load():
    from normswap.data import load_data

    d = load_data([np.random.rand(4, 3, 8, 8), torch.randn(4, 3, 8, 8)])
    assert tuple(d.inputs.shape) == (8, 3, 8, 8) and d.inputs.dtype == torch.float32 and d.labels is None
    d = load_data([torch.randn(8, 5), np.random.rand(8, 5)])  # two batches of features, not (x, y)
    assert tuple(d.inputs.shape) == (16, 5) and d.labels is None
    d = load_data((torch.randn(8, 5), torch.arange(8)[:, None]))  # (features, integer label column)
    assert d.labels.tolist() == list(range(8))
    with pytest.raises(NormswapError, match="batch 0 is a scalar"):
        load_data([torch.tensor(1.0)])


def test_a_corrupt_pt_file_is_not_called_pickled_objects(tmp_path):
    from normswap.data import load_data

    (tmp_path / "rand.pt").write_bytes(bytes(range(256)) * 2)
    with pytest.raises(NormswapError, match=r"rand.pt: cannot read data \(corrupt, or not a file torch.save wrote"):
        load_data(tmp_path / "rand.pt")


def test_a_mistyped_folder_is_reported_as_missing_not_as_no_image_folder(tmp_path):
    _one_line_error(_cli("convert", *DIGITS, "--to", "gn", "--calib", tmp_path / "imgz", "--preprocess", "none",
                         "--image-size", "32", "--no-onnx", "-o", tmp_path / "m.pt", cwd=tmp_path),
                    "imgz: no such file or folder")


def test_a_photo_collection_with_sub_folders_reads_unlabelled_without_a_warning(tmp_path):
    _png(tmp_path / "IMG_1.png")
    _png(tmp_path / "2023" / "IMG_2.png", seed=1)
    ds, said = _open(tmp_path)
    assert ds.labels is None and ds.to_dict()["layout"] == "mixed" and not said
