"""Saving models and files safely: atomic (a staged hidden file in the destination folder, then
rename; see :mod:`normswap.outputs`), never over the input file, and never over an existing output
unless ``force=True``.  A state dict / safetensors file of a converted model carries a recipe
(:mod:`normswap.recipe`) so that :func:`normswap.load_model` rebuilds it exactly."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from normswap.errors import NormswapError
from normswap.io import LoadedModel, as_module, resolve_arch

__all__ = ["atomic_save", "atomic_write_bytes", "save_model", "staged_output"]


def _check_output(path: Path, force: bool, protect: Iterable[Path] = ()) -> None:
    for p in protect:
        if p is not None and Path(p).exists() and path.exists() and path.resolve() == Path(p).resolve():
            raise NormswapError(f"{path}: refusing to overwrite the input file; choose another output with -o")
    if path.exists() and path.is_dir():
        raise NormswapError(f"{path}: is a directory, expected an output file path")
    if path.exists() and not force:
        raise NormswapError(f"{path}: already exists; pass --force (force=True) to overwrite it")
    if not path.parent.exists():
        raise NormswapError(f"{path.parent}: output folder does not exist")


@contextlib.contextmanager
def staged_output(path: str | os.PathLike, *, force: bool = False, protect: Iterable = ()):
    """``with staged_output(out) as tmp:`` write ``tmp`` (a hidden, recognisable staged file beside
    ``out``, see :class:`normswap.outputs.OutputSet`) and do any later steps; only when the block
    succeeds is ``tmp`` moved to ``out`` (no-clobber unless ``force``), otherwise it is removed:
    nothing partial is left behind and an existing ``out`` stays untouched.  ``out`` is claimed
    for the whole block (a concurrent normswap run writing it stops at once).  OS errors become
    one-line ``NormswapError``s.  Kept for callers that write one file; a run with several
    outputs claims them together with one ``OutputSet``."""
    from normswap.outputs import OutputSet

    path = Path(path)
    outs = OutputSet({"output": path}, inputs=protect, force=force, share=True)
    try:
        outs.claim()
        tmp = outs.staged("output")
        try:
            tmp.touch()
        except OSError as e:
            raise NormswapError(f"{path}: cannot write in {path.parent} ({e.strerror or e})") from None
        yield tmp
        outs.commit()
    except OSError as e:
        raise NormswapError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        outs.release()


def atomic_save(
    path: str | os.PathLike,
    writer: Callable[[Path], Any],
    *,
    force: bool = False,
    protect: Iterable[Path] = (),
) -> Path:
    """Write a file atomically: ``writer(tmp)`` writes a staged file beside ``path``, then rename.

    Nothing partial is left behind if ``writer`` fails.  ``protect`` lists
    paths (inputs) that must never be overwritten, even with ``force``.
    """
    path = Path(path)
    _check_output(path, force, protect)
    with staged_output(path, force=force, protect=protect) as tmp:
        writer(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, force: bool = False) -> Path:
    return atomic_save(path, lambda tmp: tmp.write_bytes(data), force=force)


def save_model(
    model: Any,
    path: str | os.PathLike,
    *,
    like: LoadedModel | None = None,
    format: str | None = None,
    force: bool = False,
    architecture_changed: bool = False,
    staged: bool = False,
) -> dict:
    """Save ``model`` atomically in ``format`` (default: the format of ``like``, else pickle).

    Returns a dict describing what was written (path, format, notes).  ``staged=True``: ``path``
    is already a staged file of an :class:`normswap.outputs.OutputSet` (the caller commits it),
    so the model is written straight into it, with no temporary file of its own.  A state
    dict / safetensors file of a model whose architecture differs from ``like``'s
    ``--arch`` factory carries a recipe (see :mod:`normswap.recipe`) so that
    ``load_model(path, arch=...)`` rebuilds it exactly.
    """
    import torch

    module = as_module(model, require_eager=True, job="saving")
    fmt = format or (like.format if like is not None else "pickle")
    if fmt in ("torchscript", "export"):
        fmt = "pickle"
    if fmt not in ("pickle", "state_dict", "safetensors"):
        raise NormswapError(f"unknown save format {fmt!r}; choose pickle, state_dict or safetensors")
    protect = [like.path] if like is not None and like.path is not None else []
    notes: list[str] = []
    recipe_text = None
    if fmt != "pickle":
        from normswap.recipe import dumps, make_recipe

        if like is not None and like.arch:
            reference = resolve_arch(like.arch, like.arch_kwargs, like.imports)
            changes = make_recipe(module, reference)
            if changes:
                recipe_text = dumps(changes)
                notes.append(
                    f"the architecture differs from {like.arch} in {len(changes)} place{'' if len(changes) == 1 else 's'}; "
                    f"the file carries a "
                    f"normswap recipe, so normswap.load_model(path, arch={like.arch!r}) (or --arch) rebuilds it "
                    "exactly; a plain load_state_dict() into the factory's model does not"
                )
        elif architecture_changed:
            notes.append(
                f"the architecture changed and no --arch factory is known to describe it against: this {fmt} "
                "holds only tensors; save with format='pickle' to keep the architecture"
            )
    if fmt == "pickle":
        writer = lambda tmp: torch.save(module, str(tmp))  # noqa: E731
    elif fmt == "state_dict":

        def writer(tmp):
            sd = module.state_dict()
            if recipe_text is not None:
                from normswap.recipe import RECIPE_KEY

                sd[RECIPE_KEY] = recipe_text
            torch.save(sd, str(tmp))

    else:
        from safetensors.torch import save_file

        def writer(tmp):
            from normswap.recipe import RECIPE_KEY

            sd = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
            save_file(sd, str(tmp), metadata={RECIPE_KEY: recipe_text} if recipe_text else None)

    if staged:
        try:
            writer(Path(path))
        except OSError as e:
            raise NormswapError(f"{path}: cannot write ({e.strerror or e})") from None
        return {"path": str(path), "format": fmt, "notes": notes}
    out = atomic_save(path, writer, force=force, protect=protect)
    return {"path": str(out), "format": fmt, "notes": notes}
