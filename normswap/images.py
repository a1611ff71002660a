"""A folder of images as a streaming data set (:class:`ImageFolder`).

It has the protocol of :class:`normswap.data.Dataset` (``len``, ``sample_shape``, ``labels``,
``source``, ``synthetic``, ``batches``, ``subset``, ``head``, ``to_dict``) but decodes only the
files of the batch being produced, with a thread pool (PIL's decoders and resampling release
the GIL), so a folder of any size is never in memory at once.

Layouts: a folder whose sub-folders hold the images (torchvision ImageFolder: the sorted
sub-folder names are the class indices) or a flat folder, labelled when every file name starts
with a class index (``0042_...jpg``, ``0042-...png``), unlabelled otherwise.  Files are found
recursively in sorted order; hidden files and folders, files without an image suffix and
anything that is not a regular file (FIFOs, sockets, devices) are ignored.

Bad images: every file's header is read when the folder is opened (an empty file, a text file
named .jpg, an unreadable or too large image fails there); a file whose data is broken fails
when its batch is decoded.  Either is a one-line :class:`NormswapError` naming the file.  With
``skip_bad_images`` every file is decoded once up front instead (no pixels kept) and the bad
ones are left out, their labels with them, and listed in ``skipped``.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

from normswap.dataset import IMAGE_SUFFIXES
from normswap.errors import NormswapError

__all__ = ["ImageFolder", "open_image_folder", "scan_folder", "default_workers", "IMAGE_SUFFIXES"]

LEADING_INDEX = re.compile(r"^([0-9]+)[_-]")  # ASCII digits only: a regex digit class also takes other scripts'
#: images with more pixels are refused (PIL's decompression-bomb threshold)
MAX_PIXELS = 89_478_485
_INT64_MAX = (1 << 63) - 1
SKIP_HINT = "pass --skip-bad-images to leave unreadable images out"


def default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n))


class StreamingDataError(RuntimeError):
    """A caller asked a streaming data set for all its inputs at once (an internal bug)."""


# ------------------------------------------------------------------------------ scanning


def _walk(root: Path) -> tuple[list[tuple[tuple[str, ...], Path]], dict]:
    """(relative parts, path) of every candidate image under ``root``, sorted; plus the counts
    of ignored entries."""
    found, ignored, seen = [], {"hidden": 0, "not an image suffix": 0, "not a regular file": 0}, set()

    def visit(folder: Path, parts: tuple[str, ...]) -> None:
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise NormswapError(f"{folder}: cannot list the folder ({e.strerror or e})") from None
        for e in entries:
            if e.name.startswith("."):
                ignored["hidden"] += 1
                continue
            try:
                mode = os.stat(e.path).st_mode  # follows symlinks
            except OSError:
                ignored["not a regular file"] += 1  # a dangling link
                continue
            if stat.S_ISDIR(mode):
                visit(Path(e.path), parts + (e.name,))
            elif not stat.S_ISREG(mode):
                ignored["not a regular file"] += 1
            elif Path(e.name).suffix.lower() not in IMAGE_SUFFIXES:
                ignored["not an image suffix"] += 1
            else:
                found.append((parts + (e.name,), Path(e.path)))

    visit(root, ())
    return found, {k: v for k, v in ignored.items() if v}


def scan_folder(root: Path) -> dict:
    """Files, labels and where the labels came from (no image is opened)."""
    found, ignored = _walk(root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files = [p for _, p in found]
    top = [parts for parts, _ in found if len(parts) == 1]
    # sub-folders that hold images: a folder of images beside an empty sub-folder, a symbolic link
    # back to itself or a folder named like an image is still a flat folder (its labels kept)
    holding = {parts[0] for parts, _ in found if len(parts) > 1}
    info = {"files": files, "labels": None, "classes": None, "ignored": ignored}
    if classes and not top:
        index = {c: i for i, c in enumerate(classes)}
        used = {parts[0] for parts, _ in found}
        info.update(layout="class folders", labels=[index[parts[0]] for parts, _ in found], classes=classes,
                    label_source=f"class folders ({len(classes)} sorted sub-folder names)",
                    empty_classes=[c for c in classes if c not in used])
    elif holding:
        info.update(layout="mixed", label_source=f"none: images both in the folder ({len(top)}) and in "
                                                 f"{len(holding)} sub-folder(s) ({len(files) - len(top)})")
        # labels were meant when the images beside the sub-folders carry class indices
        info["labels_lost"] = all(LEADING_INDEX.match(parts[0]) for parts in top)
    else:
        idx = [LEADING_INDEX.match(p.name) for p in files]
        info["layout"] = "flat"
        big = next((p.name for p, m in zip(files, idx) if m and int(m.group(1)) > _INT64_MAX), None)
        if files and all(idx) and big is None:
            info.update(labels=[int(m.group(1)) for m in idx], label_source="leading class index in the file names")
        elif big is not None:  # a number (a date, a hash) rather than a class index
            info.update(label_source=f"none: the leading number of {big!r} is too large for a class index",
                        labels_lost=True)
        else:
            n = sum(1 for m in idx if m)
            info["label_source"] = ("none: no file name starts with a class index" if not n else
                                    f"none: only {n} of {len(files)} file names start with a class index")
            info["labels_lost"] = n > 0
    return info


# ------------------------------------------------------------------------------ decoding


class BadImage(Exception):
    """One file that cannot be read as an image (the message is the reason)."""


def _reason(e: Exception) -> str:
    from PIL import Image, UnidentifiedImageError

    if isinstance(e, BadImage):
        return str(e)
    if isinstance(e, UnidentifiedImageError):
        return "not an image file PIL can read"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, Image.DecompressionBombError):
        return "too many pixels (decompression-bomb guard)"
    if isinstance(e, (OSError, SyntaxError, ValueError)) and "truncated" in str(e).lower():
        return "truncated image data"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _open(path: Path, transform=None):
    from PIL import Image

    if path.stat().st_size == 0:
        raise BadImage("empty file")
    im = Image.open(path)
    if im.width * im.height > MAX_PIXELS:
        why = f"{im.width}x{im.height} pixels, more than the limit of {MAX_PIXELS}"
    else:
        why = transform.check_size(im.width, im.height) if transform is not None else None
    if why is not None:
        im.close()
        raise BadImage(why)
    return im


def probe(path: Path, full: bool, transform=None) -> str | None:
    """None if ``path`` opens as an image that ``transform`` can read (``full``: and decodes),
    else the reason."""
    try:  # (no warnings.catch_warnings here: it is not thread-safe and would leak an "ignore" filter)
        with _open(path, transform) as im:
            if full:
                im.load()
    except Exception as e:  # noqa: BLE001 - every failure is a reason to report or skip
        return _reason(e)
    return None


def decode(path: Path, transform) -> "object":
    """The resized and cropped uint8 pixels (H, W, C) of one file; a BadImage on failure."""
    try:
        with _open(path, transform) as im:
            im.load()
            return transform.pixels(im)
    except Exception as e:  # noqa: BLE001
        raise BadImage(_reason(e)) from None


def skipped_message(root, skipped) -> str:
    """The one warning about the images ``--skip-bad-images`` left out of ``root``."""
    return (f"image folder {root}: skipped {len(skipped)} unreadable image(s) (first: "
            f"{show_name(Path(skipped[0][0]).name)}: {skipped[0][1]})")


def bad_image_error(path, reason: str, hint: bool = True) -> NormswapError:
    """The one-line error about one image (``hint``: suggest --skip-bad-images, when not given)."""
    return NormswapError(f"{show_name(path)}: cannot read image ({reason})" + (f"; {SKIP_HINT}" if hint else ""))


def show_name(path) -> str:
    """A file name for a one-line message: quoted, with escapes, when it holds a control character."""
    s = str(path)
    return s if s.isprintable() else repr(s)


class DecodeStats:
    """What the decoder did: ``decoded`` files, ``held`` arrays alive now, ``peak`` of held."""

    def __init__(self) -> None:
        self.decoded = self.held = self.peak = 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            self.decoded += 1
            self.held += 1
            self.peak = max(self.peak, self.held)

    def release(self, n: int) -> None:
        with self._lock:
            self.held -= n


# ------------------------------------------------------------------------------ the data set


class ImageFolder:
    """A streaming image data set; build it with :func:`open_image_folder`.

    ``on_decode(path)`` (optional) is called for every file decoded; ``stats`` counts decodes and
    the peak number of decoded images held at once."""

    synthetic = False

    def __init__(self, root, files, labels, transform, info: dict, *, skipped=(), workers: int | None = None,
                 on_decode: Callable | None = None, stats: DecodeStats | None = None) -> None:
        self.root, self.files, self.transform, self.info = Path(root), list(files), transform, info
        self._labels = None if labels is None else list(labels)
        self.skipped = list(skipped)
        self.workers = default_workers() if workers is None else max(1, int(workers))
        self.on_decode = on_decode
        self.stats = stats or DecodeStats()
        self.source = str(root)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"ImageFolder({self.source!r}, {len(self)} images, {self.transform.name})"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.transform.sample_shape)

    @property
    def labels(self):
        if self._labels is None:
            return None
        import torch

        return torch.tensor(self._labels, dtype=torch.int64)

    @property
    def inputs(self):
        raise StreamingDataError(
            "internal error: an ImageFolder streams its images and has no .inputs tensor; "
            "use .batches(batch_size), .head(n) or .subset(indices)")

    def _derive(self, indices: list[int]) -> "ImageFolder":
        labels = None if self._labels is None else [self._labels[i] for i in indices]
        return ImageFolder(self.root, [self.files[i] for i in indices], labels, self.transform, self.info,
                           skipped=self.skipped, workers=self.workers, on_decode=self.on_decode, stats=self.stats)

    def subset(self, indices) -> "ImageFolder":
        """The same kind of data set over the samples at ``indices`` (ints, a range or an int
        tensor), in that order."""
        n = len(self)
        idx = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        for i in idx:
            if not -n <= i < n:
                raise IndexError(f"sample index {i} out of range for {n} images")
        return self._derive([i % n for i in idx])

    def head(self, n: int):
        """The first ``n`` samples, decoded, as an in-memory :class:`normswap.data.Dataset`."""
        from normswap.dataset import Dataset

        k = max(0, min(int(n), len(self)))
        y = self.labels[:k] if self._labels is not None else None
        return Dataset(self._decode(range(k)), y, self.source, details=self._details())

    def batches(self, batch_size: int = 64) -> Iterator[tuple]:
        """``(x (B, C, H, W) float32, y (B,) int64 or None)``, decoding one batch at a time."""
        if int(batch_size) < 1:
            raise NormswapError(f"batch size must be at least 1, got {batch_size}")
        bs = int(batch_size)
        pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        try:
            for start in range(0, len(self), bs):
                stop = min(len(self), start + bs)
                y = None if self._labels is None else self.labels[start:stop]
                yield self._decode(range(start, stop), pool), y
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _decode(self, indices, pool=None):
        """Decode the files at ``indices`` (in parallel when there are several) into one tensor."""
        import torch

        from normswap.shapes import check_shape_size

        indices = list(indices)
        c, h, w = self.sample_shape
        check_shape_size((len(indices), c, h, w), what=f"{self.source}: a batch of images shaped")
        pixels = torch.empty((len(indices), h, w, c), dtype=torch.uint8)
        view = pixels.numpy()  # the tensor's memory: each decoded image is copied in once
        own = pool is None and self.workers > 1 and len(indices) > 1
        if own:
            pool = ThreadPoolExecutor(min(self.workers, len(indices)))
        try:
            arrays = pool.map(self._decode_one, indices) if pool is not None else map(self._decode_one, indices)
            for j, a in enumerate(arrays):
                view[j] = a
                self.stats.release(1)
        finally:
            if own:
                pool.shutdown(wait=True, cancel_futures=True)
        return self.transform.normalize(pixels)  # one vectorised step for the whole batch

    def _decode_one(self, i: int):
        path = self.files[i]
        if self.on_decode is not None:
            self.on_decode(path)
        try:
            a = decode(path, self.transform)
        except BadImage as e:
            raise bad_image_error(path, str(e), hint=not self.info.get("skip_bad_images")) from None
        self.stats.take()
        return a

    def _details(self) -> dict:
        d = {k: v for k, v in self.info.items() if k not in ("files", "labels")}
        d.update(format="image folder", preprocess=self.transform.to_dict(), skipped=len(self.skipped),
                 skipped_files=[{"file": str(f), "reason": r} for f, r in self.skipped[:20]],
                 decode_workers=self.workers)
        return d

    def to_dict(self) -> dict:
        return {"source": self.source, "samples": len(self), "sample_shape": list(self.sample_shape),
                "labelled": self._labels is not None, "synthetic": False, **self._details()}


def _check(files, labels, full: bool, skip: bool, limit: int | None, workers: int, transform=None):
    """Probe ``files`` in order (in parallel chunks) until ``limit`` good ones are found."""
    good, good_labels, skipped = [], [] if labels is not None else None, []
    want = len(files) if limit is None else min(limit, len(files))
    chunk = max(16, 4 * workers)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        pos = 0
        while len(good) < want and pos < len(files):
            part = list(range(pos, min(len(files), pos + max(chunk, want - len(good)))))
            pos = part[-1] + 1
            run = (lambda i: probe(files[i], full, transform))
            for i, reason in zip(part, pool.map(run, part) if pool is not None else map(run, part)):
                if len(good) >= want:
                    break
                if reason is None:
                    good.append(files[i])
                    if labels is not None:
                        good_labels.append(labels[i])
                elif skip:
                    skipped.append((files[i], reason))
                else:
                    raise bad_image_error(files[i], reason)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return good, good_labels, skipped


def open_image_folder(root, preprocess=None, *, model=None, input_shape=None, limit: int | None = None,
                      workers: int | None = None, on_decode: Callable | None = None) -> ImageFolder:
    """Open ``root`` as an :class:`ImageFolder` read with ``preprocess`` (a
    :class:`normswap.preprocess.Preprocess`, a preset name or None) for ``model`` /
    ``input_shape``; at most ``limit`` images (the first ones, in sorted order)."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise NormswapError("reading an image folder needs pillow: pip install pillow") from None
    from normswap.preprocess import DEFAULT_WARNING, Preprocess

    root = Path(root)
    spec = Preprocess.coerce(preprocess)
    transform = spec.resolve(model, input_shape, source=str(root))
    info = scan_folder(root)
    files = info["files"]
    if not files:
        if info.get("classes"):
            raise NormswapError(f"{root}: no images found ({len(info['classes'])} class folders, all empty)")
        raise NormswapError(f"{root}: no image files found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    workers = default_workers() if workers is None else max(1, int(workers))
    info["skip_bad_images"] = bool(spec.skip_bad_images)
    good, labels, skipped = _check(files, info["labels"], spec.skip_bad_images, spec.skip_bad_images, limit, workers,
                                   transform)
    if not good:
        raise NormswapError(f"{root}: none of the {len(skipped)} images could be read "
                            f"(first: {show_name(skipped[0][0].name)}: {skipped[0][1]})")
    if transform.source.startswith("default"):
        warnings.warn(DEFAULT_WARNING.format(src=root, h=transform.size[0], w=transform.size[1]), stacklevel=3)
    if skipped:
        warnings.warn(skipped_message(root, skipped), stacklevel=3)
    if info["labels"] is None and info.get("labels_lost"):
        # labels were meant but cannot be used: say so, or the accuracy just vanishes from the report
        warnings.warn(f"image folder {root} is read without labels ({info['label_source'].removeprefix('none: ')}); "
                      "accuracy needs class sub-folders or a class index leading every file name", stacklevel=3)
    return ImageFolder(root, good, labels if info["labels"] is not None else None, transform, info,
                       skipped=skipped, workers=workers, on_decode=on_decode)
