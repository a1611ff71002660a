"""Calibration data loading: every source and the bad-shape errors."""

import numpy as np
import pytest
import torch

from normswap.data import Dataset, example_inputs, guess_input_shape, load_data, parse_shape
from normswap.errors import NormswapError


def test_parse_shape():
    assert parse_shape("1,3,32,32") == (1, 3, 32, 32)
    assert parse_shape("2x8") == (2, 8)
    for bad in ("", "a,b", "1,-3", "0,2"):
        with pytest.raises(NormswapError, match="--input-shape"):
            parse_shape(bad)


def test_npy_npz_pt(tmp_path):
    x = np.random.rand(10, 1, 4, 4).astype(np.float32)
    y = np.arange(10) % 3
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", x=x, y=y)
    np.savez(tmp_path / "c.npz", whatever=x)
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, tmp_path / "d.pt")
    torch.save(torch.from_numpy(x), tmp_path / "e.pt")
    torch.save((torch.from_numpy(x), torch.from_numpy(y)), tmp_path / "f.pt")
    for name, labelled in [("a.npy", False), ("b.npz", True), ("c.npz", False), ("d.pt", True), ("e.pt", False), ("f.pt", True)]:
        ds = load_data(str(tmp_path / name))
        assert ds.inputs.shape == (10, 1, 4, 4) and ds.inputs.dtype == torch.float32
        assert (ds.labels is not None) == labelled
        if labelled:
            assert ds.labels.tolist() == y.tolist()
    assert len(load_data(str(tmp_path / "b.npz"), limit=4)) == 4


def test_tensor_iterable_and_dataloader():
    x = torch.randn(12, 3)
    y = torch.arange(12)
    assert load_data(x).labels is None
    ds = load_data([(x[:5], y[:5]), (x[5:], y[5:])])
    assert torch.equal(ds.inputs, x) and torch.equal(ds.labels, y)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    ds = load_data(loader, limit=8)
    assert len(ds) == 8 and ds.labels.tolist() == list(range(8))
    assert len(load_data([x[:3], x[3:]])) == 12
    assert [b[0].shape[0] for b in ds.batches(3)] == [3, 3, 2]


def test_shape_mismatch_names_expected_shape(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(NormswapError, match=r"expects \(1, 32, 32\)"):
        load_data(str(tmp_path / "a.npy"), input_shape=(1, 1, 32, 32))


def test_bad_sources(tmp_path):
    with pytest.raises(NormswapError, match="no such file"):
        load_data(str(tmp_path / "nope.npy"))
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(NormswapError, match="empty"):
        load_data(str(tmp_path / "empty.npy"))
    (tmp_path / "junk.npy").write_bytes(b"junkjunkjunk")
    with pytest.raises(NormswapError, match="cannot read data"):
        load_data(str(tmp_path / "junk.npy"))
    np.savez(tmp_path / "xy.npz", x=np.zeros((4, 2)), y=np.zeros(3))
    with pytest.raises(NormswapError, match="4 inputs but 3 labels"):
        load_data(str(tmp_path / "xy.npz"))
    with pytest.raises(NormswapError, match="needs --input-shape"):
        load_data("random")
    with pytest.raises(NormswapError, match="no batches"):
        load_data([])


def test_random_is_marked_synthetic():
    ds = load_data("random", input_shape=(1, 3, 8, 8), limit=5)
    assert ds.synthetic and ds.inputs.shape == (5, 3, 8, 8)


def test_image_folder(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray((np.random.rand(10, 12, 3) * 255).astype(np.uint8)).save(tmp_path / cls / f"{i}.png")
    with pytest.warns(UserWarning, match="--preprocess imagenet"):
        ds = load_data(str(tmp_path), input_shape=(1, 3, 8, 8)).head(10)  # a streaming set: decoded here
    assert ds.inputs.shape == (4, 3, 8, 8) and ds.labels.tolist() == [0, 0, 1, 1]
    assert 0 <= float(ds.inputs.min()) and float(ds.inputs.max()) <= 1
    with pytest.warns(UserWarning):
        gray = load_data(str(tmp_path), input_shape=(1, 1, 6, 6))
    assert gray.head(4).inputs.shape == (4, 1, 6, 6)
    with pytest.raises(NormswapError, match="needs --input-shape"):
        load_data(str(tmp_path))


def test_example_inputs():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    assert guess_input_shape(conv) == (2, 3, 32, 32)
    assert example_inputs(conv)[0].shape == (2, 3, 32, 32)
    assert example_inputs(input_shape=(3, 5))[0].shape == (3, 5)
    ds = Dataset(torch.zeros(10, 5))
    assert example_inputs(data=ds, batch=4)[0].shape == (4, 5)
    with pytest.raises(NormswapError, match="--input-shape"):
        example_inputs(torch.nn.Sequential(torch.nn.ReLU()))


def test_one_tuple_pt_and_exported_program_example_inputs(tmp_path):
    x = torch.randn(3, 2, 4, 4)
    torch.save((x,), tmp_path / "x.pt")  # example inputs saved as a tuple
    assert torch.equal(load_data(tmp_path / "x.pt").inputs, x)
    m = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    ep = torch.export.export(m, (torch.randn(2, 2, 5, 5),))
    assert guess_input_shape(ep) in (None, (2, 2, 32, 32))  # no AttributeError on a program
    assert example_inputs(ep)[0].shape == (2, 2, 5, 5)  # the program's own example inputs
