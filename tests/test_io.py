"""Safe model loading and atomic saving: every format and every bad input."""

import os
import pickle
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from normswap.errors import NormswapError
from normswap.io import LoadedModel, as_module, load_model
from normswap.save import atomic_save, save_model

MODEL_SRC = textwrap.dedent(
    """
    import torch.nn as nn
    class Net(nn.Module):
        def __init__(self, c=4):
            super().__init__()
            self.conv = nn.Conv2d(1, c, 3)
            self.bn = nn.BatchNorm2d(c)
        def forward(self, x):
            return self.bn(self.conv(x))
    def make(c=4):
        return Net(c)
    def not_a_module():
        return 3
    def broken():
        raise ValueError("boom")
    """
)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with a user model package `umodels` importable from the cwd."""
    (tmp_path / "umodels.py").write_text(MODEL_SRC)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("umodels", None)
    sys.path.insert(0, str(tmp_path))
    import umodels

    sys.path.remove(str(tmp_path))
    model = umodels.Net().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    yield tmp_path, model
    sys.modules.pop("umodels", None)


def _same(a, b):
    x = torch.randn(2, 1, 8, 8)
    return torch.equal(a.eval()(x), b.eval()(x))


def test_state_dict_with_arch(work):
    d, model = work
    torch.save(model.state_dict(), d / "m.pt")
    loaded = load_model(d / "m.pt", arch="umodels:make")
    assert loaded.format == "state_dict" and loaded.notes == []
    assert _same(loaded.module, model)


def test_checkpoint_dict_with_state_dict_key(work):
    d, model = work
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, d / "ckpt.pth")
    assert _same(load_model(d / "ckpt.pth", arch="umodels:make").module, model)


def test_arch_kwargs_json_and_shape_mismatch(work):
    d, model = work
    torch.save(model.state_dict(), d / "m.pt")
    with pytest.raises(NormswapError, match="shape mismatch.*conv.weight"):
        load_model(d / "m.pt", arch="umodels:make", arch_kwargs='{"c": 5}')
    with pytest.raises(NormswapError, match="not valid JSON"):
        load_model(d / "m.pt", arch="umodels:make", arch_kwargs="{c: 5")


def test_missing_and_unexpected_keys_are_reported(work):
    d, model = work
    sd = model.state_dict()
    sd.pop("bn.running_mean")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, d / "m.pt")
    with pytest.raises(NormswapError, match="does not fit --arch .*missing.*bn.running_mean.*extra.weight.*--non-strict"):
        load_model(d / "m.pt", arch="umodels:make")  # issue 20: strict unless asked otherwise
    loaded = load_model(d / "m.pt", arch="umodels:make", strict=False)
    text = " ".join(loaded.notes)
    assert "missing key" in text and "bn.running_mean" in text
    assert "unexpected key" in text and "extra.weight" in text
    assert loaded.missing_keys == ["bn.running_mean"] and loaded.unexpected_keys == ["extra.weight"]


def test_no_key_matches_is_an_error(work):
    d, _ = work
    torch.save({"foo.weight": torch.zeros(2)}, d / "m.pt")
    with pytest.raises(NormswapError, match="none of the 1 keys match"):
        load_model(d / "m.pt", arch="umodels:make")


def test_safetensors(work):
    from safetensors.torch import save_file

    d, model = work
    save_file(model.state_dict(), str(d / "m.safetensors"))
    loaded = load_model(d / "m.safetensors", arch="umodels:make")
    assert loaded.format == "safetensors" and _same(loaded.module, model)
    with pytest.raises(NormswapError, match="safetensors.*--arch"):
        load_model(d / "m.safetensors")


def test_format_is_detected_from_content_not_extension(work):
    d, model = work
    torch.save(model.state_dict(), d / "weights.bin")
    assert load_model(d / "weights.bin", arch="umodels:make").format == "state_dict"


def test_pickled_module_refused_without_trust(work):
    d, model = work
    torch.save(model, d / "whole.pt")
    with pytest.raises(NormswapError) as e:
        load_model(d / "whole.pt")
    msg = str(e.value)
    assert "arbitrary code" in msg and "--trust" in msg and "umodels.Net" in msg and "\n" not in msg


def test_pickled_module_with_trust(work):
    d, model = work
    torch.save(model, d / "whole.pt")
    loaded = load_model(d / "whole.pt", trust=True)
    assert loaded.format == "pickle" and _same(loaded.module, model)


def test_plain_pickle_with_trust(work):
    d, model = work
    with open(d / "raw.pkl", "wb") as f:
        pickle.dump(model, f)
    with pytest.raises(NormswapError, match="arbitrary code"):
        load_model(d / "raw.pkl")
    assert _same(load_model(d / "raw.pkl", trust=True).module, model)


def test_pickled_module_missing_class(work, tmp_path_factory):
    d, model = work
    torch.save(model, d / "whole.pt")
    other = tmp_path_factory.mktemp("elsewhere")
    os.chdir(other)  # umodels is no longer importable
    sys.modules.pop("umodels", None)
    with pytest.raises(NormswapError, match="umodels.*--import"):
        load_model(d / "whole.pt", trust=True)


def test_import_option_makes_classes_importable(work, tmp_path_factory, monkeypatch):
    d, model = work
    pkg = tmp_path_factory.mktemp("pkgroot")
    (pkg / "umodels.py").write_text(MODEL_SRC)
    torch.save(model, d / "whole.pt")
    monkeypatch.chdir(pkg)  # cwd on sys.path makes `umodels` importable
    sys.modules.pop("umodels", None)
    loaded = load_model(d / "whole.pt", trust=True, imports=["umodels"])
    assert type(loaded.module).__name__ == "Net"
    with pytest.raises(NormswapError, match="--import nosuchmodule"):
        load_model(d / "whole.pt", trust=True, imports=["nosuchmodule"])


def test_pickle_of_something_else(work):
    d, _ = work
    torch.save(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), d / "opt.pt")
    with pytest.raises(NormswapError, match="not a torch.nn.Module"):
        load_model(d / "opt.pt", trust=True)


def test_plain_data_is_not_a_model(work):
    d, _ = work
    torch.save([1, 2, 3], d / "list.pt")
    with pytest.raises(NormswapError, match="plain data"):
        load_model(d / "list.pt")


def test_torchscript_loads_but_is_not_rewritable(work):
    d, model = work
    torch.jit.save(torch.jit.script(model), str(d / "ts.pt"))
    loaded = load_model(d / "ts.pt")
    assert loaded.format == "torchscript"
    with pytest.raises(NormswapError, match="TorchScript cannot be rewritten.*--arch"):
        as_module(loaded, require_eager=True, job="fold")


def test_torch_export_program(work):
    d, model = work
    ep = torch.export.export(model, (torch.randn(1, 1, 8, 8),))
    torch.export.save(ep, str(d / "prog.pt2"))
    loaded = load_model(d / "prog.pt2")
    assert loaded.format == "export"
    assert isinstance(loaded.module, torch.export.ExportedProgram)
    with pytest.raises(NormswapError, match="torch.export program"):
        as_module(loaded, require_eager=True, job="convert")


@pytest.mark.parametrize(
    "setup, kwargs, pattern",
    [
        (lambda d: None, {}, "no such file"),
        (lambda d: (d / "adir.pt").mkdir(), {}, "is a directory"),
        (lambda d: (d / "empty.pt").write_bytes(b""), {}, "file is empty"),
        (lambda d: (d / "junk.pt").write_bytes(b"hello world, not a model"), {}, "not a PyTorch model file"),
        (lambda d: (d / "m.onnx").write_bytes(b"\x08\x07\x12\x07pytorch"), {}, "ONNX model"),
    ],
    ids=["missing", "directory", "empty", "junk", "onnx"],
)
def test_bad_paths(work, setup, kwargs, pattern):
    d, _ = work
    setup(d)
    name = {"no such file": "missing.pt", "is a directory": "adir.pt", "file is empty": "empty.pt"}.get(pattern)
    name = name or ("junk.pt" if "PyTorch" in pattern else "m.onnx")
    with pytest.raises(NormswapError, match=pattern) as e:
        load_model(d / name, **kwargs)
    assert "\n" not in str(e.value)


def test_truncated_archive(work):
    d, model = work
    torch.save(model.state_dict(), d / "m.pt")
    data = (d / "m.pt").read_bytes()
    (d / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(NormswapError, match="truncated or corrupt"):
        load_model(d / "cut.pt", arch="umodels:make")


def test_corrupt_member_in_archive(work):
    d, model = work
    torch.save(model.state_dict(), d / "m.pt")
    data = bytearray((d / "m.pt").read_bytes())
    i = data.find(b"data.pkl") + 200  # scribble over the pickle payload
    data[i : i + 40] = b"\xff" * 40
    (d / "bad.pt").write_bytes(bytes(data))
    with pytest.raises(NormswapError):
        load_model(d / "bad.pt", arch="umodels:make")


def test_state_dict_without_arch(work):
    d, model = work
    torch.save(model.state_dict(), d / "m.pt")
    with pytest.raises(NormswapError, match="state dict.*--arch"):
        load_model(d / "m.pt")


@pytest.mark.parametrize(
    "arch, pattern",
    [
        ("nosuchpkg.models:make", "cannot import module 'nosuchpkg.models'"),
        ("umodels:nothere", "has no attribute 'nothere'"),
        ("umodels:not_a_module", "returned a int, not a torch.nn.Module"),
        ("umodels:broken", "calling the factory failed.*boom"),
        ("umodels.make", "expected 'package.module:factory'"),
    ],
)
def test_bad_arch(work, arch, pattern):
    d, model = work
    torch.save(model.state_dict(), d / "m.pt")
    with pytest.raises(NormswapError, match=pattern):
        load_model(d / "m.pt", arch=arch)


# ------------------------------------------------------------------ saving


def test_save_keeps_format_and_never_overwrites_input(work):
    d, model = work
    torch.save(model.state_dict(), d / "m.pt")
    before = (d / "m.pt").read_bytes()
    loaded = load_model(d / "m.pt", arch="umodels:make")
    with pytest.raises(NormswapError, match="overwrite the input"):
        save_model(loaded.module, d / "m.pt", like=loaded, force=True)
    assert (d / "m.pt").read_bytes() == before
    info = save_model(loaded.module, d / "out.pt", like=loaded)
    assert info["format"] == "state_dict" and info["notes"] == []  # same architecture: no recipe
    assert isinstance(torch.load(d / "out.pt", weights_only=True), dict)


def test_save_refuses_existing_output_unless_force(work):
    d, model = work
    (d / "out.pt").write_bytes(b"keep me")
    with pytest.raises(NormswapError, match="already exists.*--force"):
        save_model(model, d / "out.pt")
    assert (d / "out.pt").read_bytes() == b"keep me"
    save_model(model, d / "out.pt", force=True)
    assert isinstance(torch.load(d / "out.pt", weights_only=False), nn.Module)


def test_save_pickle_roundtrip_and_safetensors(work):
    d, model = work
    save_model(model, d / "p.pt", format="pickle")
    assert _same(load_model(d / "p.pt", trust=True).module, model)
    save_model(model, d / "s.safetensors", format="safetensors")
    assert _same(load_model(d / "s.safetensors", arch="umodels:make").module, model)


def test_atomic_save_leaves_nothing_on_failure(tmp_path):
    def writer(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_save(tmp_path / "out.bin", writer)
    assert list(tmp_path.iterdir()) == []


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(NormswapError, match="does not exist"):
        save_model(nn.Linear(2, 2), tmp_path / "nope" / "m.pt")


def test_loaded_model_to_dict(work):
    d, model = work
    torch.save(model.state_dict(), d / "m.pt")
    info = load_model(d / "m.pt", arch="umodels:make", arch_kwargs={"c": 4}).to_dict()
    assert info["format"] == "state_dict" and info["arch"] == "umodels:make" and info["type"] == "Net"


def test_atomic_save_unwritable_folder_is_one_line_error(tmp_path):
    # /proc accepts no new files, even for root: the OSError must become a NormswapError
    with pytest.raises(NormswapError, match="cannot write"):
        atomic_save("/proc/normswap-qa.bin", lambda tmp: tmp.write_bytes(b"x"))

    def fails(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(NormswapError, match="No space left"):
        atomic_save(tmp_path / "out.bin", fails)
    assert os.listdir(tmp_path) == []


def test_incomplete_torch_archive_is_named_as_such(tmp_path):
    import zipfile

    p = tmp_path / "half.pt"
    with zipfile.ZipFile(p, "w") as z:  # what a torch.save that failed part-way leaves
        z.writestr("half/version", "3\n")
        z.writestr("half/byteorder", "little")
    with pytest.raises(NormswapError, match="incomplete PyTorch archive"):
        load_model(p)


# ------------------------------------------------------------------ recipes (changed architectures)


@pytest.mark.parametrize("fmt, name", [("state_dict", "changed.pt"), ("safetensors", "changed.safetensors")])
def test_changed_architecture_roundtrips_through_a_state_dict(work, fmt, name):
    """A state dict cannot say GroupNorm(2, 4) vs GroupNorm(4, 4), nor that a conv gained a bias:
    the recipe saved beside the tensors rebuilds exactly that architecture."""
    d, model = work
    torch.save(model.state_dict(), d / "m.pt")
    loaded = load_model(d / "m.pt", arch="umodels:make")
    changed = loaded.module
    changed.bn = nn.GroupNorm(2, 4)
    with torch.no_grad():
        changed.bn.weight.uniform_(0.5, 2)
        changed.bn.bias.uniform_(-1, 1)
    changed.conv.bias = None  # a conv without bias in the file ...
    changed.conv.bias = nn.Parameter(torch.randn(4))  # ... that gained one (as a fold does)
    info = save_model(changed, d / name, like=loaded, format=fmt)
    assert "recipe" in info["notes"][0]
    back = load_model(d / name, arch="umodels:make")
    assert isinstance(back.module.bn, nn.GroupNorm) and back.module.bn.num_groups == 2
    assert any("recipe" in n for n in back.notes) and not any("keys" in n for n in back.notes)
    assert _same(back.module, changed)


def test_recipe_only_builds_allowlisted_types(work):
    from normswap.recipe import apply_recipe, build_module, make_recipe, module_spec

    d, model = work
    with pytest.raises(NormswapError, match="unknown module type"):
        build_module({"type": "os.system", "args": {}})

    class Odd(nn.Module):
        pass

    other = umodels_net = type(model)()
    umodels_net.bn = Odd()
    with pytest.raises(NormswapError, match="cannot be described"):
        make_recipe(other, type(model)())
    with pytest.raises(NormswapError, match="no module 'nothere'"):
        apply_recipe(type(model)(), [{"name": "nothere.x", **module_spec(nn.Identity())}])
