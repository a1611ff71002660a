"""Loading models safely.

Formats are detected from a file's *content*, never its extension:

==============  ==========================================================
format          how it is recognised / loaded
==============  ==========================================================
``state_dict``  a ``torch.save`` zip whose pickle holds only tensors
                (``torch.load(weights_only=True)``); needs ``arch``
``safetensors`` 8-byte little-endian header length + JSON header; needs ``arch``
``pickle``      a ``torch.save(model)`` archive: refused unless ``trust=True``
                because unpickling runs arbitrary code
``torchscript`` a zip with ``code/`` entries (``torch.jit.load``): audit only
``export``      a ``torch.export.save`` archive (``archive_format`` entry)
==============  ==========================================================

Saving is in :mod:`normswap.save`.  ``_load_model`` (about 80 lines) is the format dispatch: one
branch per format.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import json
import os
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from normswap.errors import NormswapError

FORMATS = ("pickle", "state_dict", "safetensors", "torchscript", "export")


@dataclass
class LoadedModel:
    """A model together with where it came from (used to save it back alike)."""

    module: Any  # nn.Module, torch.jit.ScriptModule or torch.export.ExportedProgram
    format: str
    path: Path | None = None
    arch: str | None = None
    arch_kwargs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    imports: tuple = ()
    #: state-dict keys the model has but the file lacks (left at the factory's initial values)
    missing_keys: list[str] = field(default_factory=list)
    #: keys of the file the model has no place for (ignored)
    unexpected_keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path) if self.path else None,
            "format": self.format,
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "type": type(self.module).__name__,
            "notes": list(self.notes),
            "missing_keys": list(self.missing_keys),
            "unexpected_keys": list(self.unexpected_keys),
        }


# --------------------------------------------------------------------------- sniffing


def _sniff(path: Path) -> str:
    """Return one of FORMATS (or raise NormswapError) from the file's bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise NormswapError(f"{path}: file is empty")
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise NormswapError(f"{path}: truncated or corrupt archive ({e})") from None
        if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            return "export"
        if any("/code/" in n or n.startswith("code/") for n in names) or any(
            n.endswith("constants.pkl") for n in names
        ):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch_zip"
        if any(n.endswith(("/byteorder", "/version", "/.format_version")) for n in names):
            # torch.save writes these first: a save that failed part-way leaves an archive without data.pkl
            raise NormswapError(f"{path}: incomplete PyTorch archive (no data.pkl inside; was the save interrupted?)")
        raise NormswapError(f"{path}: a zip archive but not a PyTorch file (no data.pkl inside)")
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < n < 100_000_000 and n + 8 <= path.stat().st_size:
            return "safetensors"
    if head[:1] == b"\x80":  # legacy (non-zip) torch.save pickle
        return "torch_legacy"
    if head[:1] == b"\x08" or b"onnx" in head.lower() or path.suffix == ".onnx":
        # ONNX protobufs start with field 1 (ir_version, varint): 0x08
        raise NormswapError(f"{path}: looks like an ONNX model; normswap needs the PyTorch model (.pt/.pth/.safetensors/.pt2)")
    raise NormswapError(f"{path}: not a PyTorch model file (unrecognised content)")


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _import_path(imports: Iterable[str] = ()):
    """Put the current directory on sys.path and import the user's modules."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        for name in imports:
            try:
                importlib.import_module(name)
            except Exception as e:  # ImportError and errors raised by the module itself
                raise NormswapError(f"--import {name}: cannot import module ({type(e).__name__}: {e})") from None
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def resolve_arch(arch: str, arch_kwargs: dict | None = None, imports: Iterable[str] = ()):
    """Build a module from ``pkg.module:factory`` (called with ``arch_kwargs``)."""
    import torch.nn as nn

    if ":" not in arch:
        raise NormswapError(f"--arch {arch!r}: expected 'package.module:factory'")
    mod_name, _, attr = arch.partition(":")
    with _import_path(imports):
        try:
            mod = importlib.import_module(mod_name)
        except Exception as e:
            raise NormswapError(f"--arch {arch}: cannot import module {mod_name!r} ({type(e).__name__}: {e})") from None
        obj = mod
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise NormswapError(f"--arch {arch}: module {mod_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if not callable(obj):
            raise NormswapError(f"--arch {arch}: {attr!r} is not callable")
        try:
            model = obj(**(arch_kwargs or {}))
        except Exception as e:
            raise NormswapError(f"--arch {arch}: calling the factory failed ({type(e).__name__}: {e})") from None
    if not isinstance(model, nn.Module):
        raise NormswapError(f"--arch {arch}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    # Trained weights are loaded for inference: a factory builds its model in training mode,
    # which would make every BatchNorm look like (and export as) a train-mode norm.
    return model.eval()


def _parse_arch_kwargs(arch_kwargs) -> dict:
    if arch_kwargs is None:
        return {}
    if isinstance(arch_kwargs, dict):
        return arch_kwargs
    try:
        value = json.loads(arch_kwargs)
    except json.JSONDecodeError as e:
        raise NormswapError(f"--arch-kwargs: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise NormswapError("--arch-kwargs: must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


def _unwrap_state_dict(obj: Any) -> dict | None:
    """A state dict, or a checkpoint dict holding one under a usual key (a normswap recipe
    entry, if any, is left in ``obj`` and skipped here)."""
    import torch

    from normswap.recipe import RECIPE_KEY

    if isinstance(obj, dict) and RECIPE_KEY in obj:
        obj = {k: v for k, v in obj.items() if k != RECIPE_KEY}
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model_state_dict", "model", "module", "net"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    return None


def _load_state_dict_into(model, sd: dict, path: Path, arch: str, notes: list[str], strict: bool | None = None):
    own = model.state_dict()
    matched = [k for k in sd if k in own]
    if own and not matched:
        raise NormswapError(
            f"{path}: none of the {len(sd)} keys match the architecture {arch} "
            f"(file has e.g. {next(iter(sd))!r}, model expects e.g. {next(iter(own))!r})"
        )
    bad = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in matched
        if tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise NormswapError(f"{path}: shape mismatch with {arch}: " + "; ".join(bad[:3]) + more)
    result = model.load_state_dict(sd, strict=False)
    if strict is None:
        strict = _load_defaults()["strict"]
    if strict and (result.missing_keys or result.unexpected_keys):
        raise NormswapError(f"{path}: the file does not fit --arch {arch}: "
                            + _key_mismatch(list(result.missing_keys), list(result.unexpected_keys))
                            + "; check --arch / --arch-kwargs, or pass --non-strict to load it anyway (missing "
                              "tensors keep the factory's initial values, unexpected ones are ignored; both are "
                              "listed in every report)")
    if result.missing_keys:
        notes.append(f"--non-strict: {len(result.missing_keys)} missing key(s), left at the factory's initial "
                     f"values: {_some_keys(result.missing_keys)}")
    if result.unexpected_keys:
        notes.append(f"--non-strict: {len(result.unexpected_keys)} unexpected key(s) of the file, ignored: "
                     f"{_some_keys(result.unexpected_keys)}")
    return list(result.missing_keys), list(result.unexpected_keys)


def _some_keys(keys, limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more (all listed in the JSON report)" if len(keys) > limit else "")


_LOAD_DEFAULTS = contextvars.ContextVar("normswap_load_defaults", default=None)


def _load_defaults() -> dict:
    return _LOAD_DEFAULTS.get() or {"strict": True, "loaded": None}


@contextlib.contextmanager
def load_options(*, strict: bool = True):
    """Defaults for every :func:`load_model` call inside the block that does not pass them (the
    CLI's ``--non-strict`` reaches the jobs this way), and a record of what was loaded:
    ``with load_options(strict=False) as rec: convert_file(...)`` -> ``rec["loaded"]`` lists the
    LoadedModels."""
    rec = {"strict": bool(strict), "loaded": []}
    token = _LOAD_DEFAULTS.set(rec)
    try:
        yield rec
    finally:
        _LOAD_DEFAULTS.reset(token)


def loaded_models() -> list:
    """The LoadedModels loaded so far inside the current :func:`load_options` block ([] outside)."""
    rec = _LOAD_DEFAULTS.get()
    return list(rec.get("loaded") or []) if rec else []


def _key_mismatch(missing: list[str], unexpected: list[str]) -> str:
    def some(keys):
        shown = ", ".join(repr(k) for k in keys[:3])
        return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    bits = []
    if missing:
        bits.append(f"{len(missing)} tensor(s) the model has are missing from the file ({some(missing)})")
    if unexpected:
        bits.append(f"{len(unexpected)} tensor(s) of the file have no place in the model ({some(unexpected)})")
    return "; ".join(bits)


def _safetensors_recipe(path: Path) -> str | None:
    from safetensors import safe_open

    from normswap.recipe import RECIPE_KEY

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(RECIPE_KEY)


def _apply_saved_recipe(model, text: Any, path: Path, notes: list[str]) -> None:
    """Rebuild the saved architecture (see normswap.recipe) before the tensors are loaded."""
    if text is None:
        return
    from normswap.recipe import apply_recipe, loads

    if not isinstance(text, str):
        raise NormswapError(f"{path}: the normswap recipe entry is not text")
    n = apply_recipe(model, loads(text))
    notes.append(f"rebuilt the saved architecture from the normswap recipe in the file ({n} change{'' if n == 1 else 's'} to the factory's model)")


def _refuse_pickle(path: Path) -> NormswapError:
    import torch

    classes: list[str] = []
    with contextlib.suppress(Exception):
        classes = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    shown = ", ".join(classes[:4]) + (" …" if len(classes) > 4 else "")
    what = f" (it references {shown})" if shown else ""
    return NormswapError(
        f"{path}: is a pickled Python object{what}; unpickling can run arbitrary code, so it is refused. "
        "Pass --trust (trust=True) if you trust this file, or save a state dict and pass --arch pkg.module:factory"
    )


def _load_pickle(path: Path, imports: Iterable[str]):
    import torch
    import torch.nn as nn

    with _import_path(imports):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    obj = torch.load(str(path), map_location="cpu", weights_only=False)
                except RuntimeError as e:
                    if "magic number" not in str(e):
                        raise
                    import pickle

                    with open(path, "rb") as f:  # a plain pickle.dump, not torch.save
                        obj = pickle.load(f)
        except (ModuleNotFoundError, AttributeError) as e:
            msg = str(e)
            raise NormswapError(
                f"{path}: the pickled model needs a class that cannot be imported ({msg}); "
                "run from the folder that holds its code or pass --import MODULE"
            ) from None
        except Exception as e:
            raise NormswapError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from None
    if isinstance(obj, nn.Module):
        return obj
    raise NormswapError(f"{path}: the pickle holds a {type(obj).__module__}.{type(obj).__name__}, not a torch.nn.Module")


# --------------------------------------------------------------------------- public API


def load_model(path: str | os.PathLike, *, arch: str | None = None, arch_kwargs: dict | str | None = None,
               trust: bool = False, imports: Iterable[str] = (), strict: bool | None = None) -> LoadedModel:
    """Load a model file safely; see the module docstring for the formats.

    ``strict`` (default True, or the :func:`load_options` in effect): a state dict / safetensors
    file must fit the ``arch`` model exactly (no missing, no unexpected keys); with
    ``strict=False`` (``--non-strict``) such keys are allowed and listed in ``missing_keys`` /
    ``unexpected_keys`` (and in every report).
    Raises :class:`NormswapError` with a one-line message for every bad input (a FIFO or
    device is refused before it is opened).
    """
    loaded = _load_model(path, arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports, strict=strict)
    rec = _LOAD_DEFAULTS.get()
    if rec is not None and rec.get("loaded") is not None:
        rec["loaded"].append(loaded)
    return loaded


def _load_model(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: dict | str | None = None,
    trust: bool = False,
    imports: Iterable[str] = (),
    strict: bool | None = None,
) -> LoadedModel:
    import torch

    from normswap.inputs import check_input_path

    check_input_path(path, "model file", folder_ok=False)
    path = Path(path)
    if not path.exists():
        raise NormswapError(f"{path}: no such file")
    if path.is_dir():
        raise NormswapError(f"{path}: is a directory, expected a model file")
    kwargs = _parse_arch_kwargs(arch_kwargs)
    imports = tuple(imports)
    kind = _sniff(path)
    notes: list[str] = []

    if kind == "torchscript":
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise NormswapError(f"{path}: corrupt TorchScript archive ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return LoadedModel(module, "torchscript", path, notes=notes)

    if kind == "export":
        try:
            program = torch.export.load(str(path))
        except Exception as e:
            raise NormswapError(f"{path}: cannot load torch.export program ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return LoadedModel(program, "export", path, notes=notes)

    if kind == "safetensors":
        try:
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        except Exception as e:
            raise NormswapError(f"{path}: corrupt safetensors file ({type(e).__name__}: {e})") from None
        if arch is None:
            raise NormswapError(
                f"{path}: holds only weights (safetensors, {len(sd)} tensors); pass --arch pkg.module:factory to build the model"
            )
        model = resolve_arch(arch, kwargs, imports)
        _apply_saved_recipe(model, _safetensors_recipe(path), path, notes)
        missing, unexpected = _load_state_dict_into(model, sd, path, arch, notes, strict)
        return LoadedModel(model, "safetensors", path, arch, kwargs, notes, imports, missing, unexpected)

    # torch.save archives (zip or legacy): weights-only first, never unpickle code unless trusted
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle_errors() as e:
        if "Unsupported global" in str(e) or "WeightsUnpickler" in str(e) or "weights_only" in str(e):
            if not trust:
                raise _refuse_pickle(path) from None
            return LoadedModel(_load_pickle(path, imports), "pickle", path, notes=notes)
        raise NormswapError(f"{path}: truncated or corrupt PyTorch file ({type(e).__name__}: {first_line(e)})") from None
    except Exception as e:
        raise NormswapError(f"{path}: truncated or corrupt PyTorch file ({type(e).__name__}: {first_line(e)})") from None
    sd = _unwrap_state_dict(obj)
    if sd is None:
        raise NormswapError(
            f"{path}: holds a {type(obj).__name__} of plain data, neither a model nor a state dict of tensors"
        )
    if arch is None:
        raise NormswapError(
            f"{path}: is a state dict ({len(sd)} tensors) without the architecture; pass --arch pkg.module:factory"
        )
    model = resolve_arch(arch, kwargs, imports)
    from normswap.recipe import RECIPE_KEY

    _apply_saved_recipe(model, obj.get(RECIPE_KEY) if isinstance(obj, dict) else None, path, notes)
    missing, unexpected = _load_state_dict_into(model, sd, path, arch, notes, strict)
    return LoadedModel(model, "state_dict", path, arch, kwargs, notes, imports, missing, unexpected)


def pickle_errors():
    import pickle

    return (pickle.UnpicklingError, RuntimeError)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def as_module(model: Any, *, require_eager: bool = False, job: str = "this job"):
    """Return the nn.Module behind ``model`` (an nn.Module or a LoadedModel).

    With ``require_eager`` TorchScript and torch.export programs are refused
    with a message saying what to pass instead.
    """
    import torch
    import torch.nn as nn

    module = model.module if isinstance(model, LoadedModel) else model
    if require_eager:
        if isinstance(module, torch.jit.ScriptModule):
            raise NormswapError(
                f"{job} needs an eager nn.Module: TorchScript cannot be rewritten; pass the original model "
                "(a state dict with --arch pkg.module:factory, or a pickled module with --trust)"
            )
        if isinstance(module, torch.export.ExportedProgram):
            raise NormswapError(
                f"{job} needs an eager nn.Module: a torch.export program cannot be rewritten in place; pass the "
                "original model (a state dict with --arch, or a pickled module with --trust)"
            )
    if not isinstance(module, (nn.Module, torch.export.ExportedProgram)):
        raise NormswapError(f"expected a torch.nn.Module, got {type(module).__name__}")
    return module
