"""How an image file becomes a model input: the one place where presets, the options that
override them and a timm model's ``pretrained_cfg`` are turned into numbers.

:class:`Preprocess` is what was asked for (``--preprocess``, ``--image-size``, ``--resize``,
``--crop-pct``, ``--interpolation``, ``--skip-bad-images``); :meth:`Preprocess.resolve` turns it,
with the model and ``--input-shape``, into an :class:`ImageTransform` (concrete size, channels,
geometry, mean/std) that maps a PIL image to a float32 ``(C, H, W)`` array.

Presets (``S`` = ``--image-size``):

* ``imagenet``: resize the shorter side to ``round(S / 0.875)`` (256 for 224), centre crop S,
  scale to [0, 1], subtract mean (0.485, 0.456, 0.406) and divide by std (0.229, 0.224, 0.225);
  bilinear.  (torchvision / timm evaluation.)
* ``inception``: the same geometry (default S = 299), scaled to [-1, 1].
* ``tf-lite``: centre crop of ``S / (S + 32) * min(h, w)`` (TF EfficientNet evaluation), resize
  to S x S, bicubic, ``(pixel - 127) / 128``.
* ``none``: plain resize to H x W (aspect ratio not kept), scaled to [0, 1].

Resizing is PIL's (antialiased; what torchvision and timm do on PIL images).  TF resizes with
its own bicubic kernel, so ``tf-lite`` matches TF's numbers only approximately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from normswap.errors import NormswapError

__all__ = ["Preprocess", "ImageTransform", "PRESETS", "INTERPOLATIONS", "parse_image_size"]

PRESETS = ("imagenet", "inception", "tf-lite", "none")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875
#: the default image size of each preset (``none`` has none: it needs --image-size / --input-shape)
DEFAULT_SIZE = {"imagenet": 224, "inception": 299, "tf-lite": 224}
MAX_SIDE = 8192  # larger image sides are refused (a batch of them would not fit in memory)
#: an image whose resize step would make more pixels is not read (a thin strip resized by its shorter side)
MAX_WORK_PIXELS = 1 << 24
TF_CROP_PADDING = 32
DEFAULT_WARNING = ("image folder {src}: no --preprocess given, read with 'none' (plain resize to {h}x{w}, "
                   "pixels in [0, 1], no mean/std); a model trained on normalised images needs "
                   "--preprocess imagenet, inception or tf-lite")


def _positive_int(text, option: str, limit: int = MAX_SIDE) -> int:
    try:
        v = int(str(text).strip())
    except (TypeError, ValueError):
        raise NormswapError(f"{option} {text!r}: expected a positive integer") from None
    if not 0 < v <= limit:
        raise NormswapError(f"{option} {text!r}: expected a positive integer up to {limit}")
    return v


def parse_channel_values(text, option: str, positive: bool = False) -> tuple[float, ...] | None:
    """``--mean`` / ``--std``: one value or one per channel (``"0.485,0.456,0.406"``), in the
    units of pixels scaled to [0, 1] (torchvision's ``Normalize``)."""
    if text is None:
        return None
    parts = list(text) if isinstance(text, (tuple, list)) else str(text).replace(" ", "").split(",")
    try:
        vals = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        raise NormswapError(f"{option} {text!r}: expected a number or one per channel, e.g. 0.485,0.456,0.406") \
            from None
    if len(vals) not in (1, 3) or not all(math.isfinite(v) for v in vals) or (positive and min(vals) <= 0):
        need = "positive " if positive else ""
        raise NormswapError(f"{option} {text!r}: expected one or three finite {need}numbers (pixels in [0, 1])")
    return vals


def parse_image_size(text) -> tuple[int, int] | None:
    """``--image-size``: ``"224"`` -> (224, 224); ``"224,320"`` / ``"224x320"`` -> (H, W)."""
    if text is None:
        return None
    if isinstance(text, int):
        text = str(text)
    parts = list(text) if isinstance(text, (tuple, list)) else str(text).replace("x", ",").split(",")
    if len(parts) not in (1, 2) or any(str(p).strip() == "" for p in parts):
        raise NormswapError(f"--image-size {text!r}: expected S or H,W (positive integers)")
    sizes = [_positive_int(p, "--image-size") for p in parts]
    return (sizes[0], sizes[-1])


@dataclass(frozen=True)
class Preprocess:
    """What the user asked for; everything optional (see the module docstring).

    ``preset`` None means: the model's ``pretrained_cfg`` when it has one, else ``none`` with a
    warning.  ``skip_bad_images``: skip (and count) images that cannot be decoded instead of
    failing."""

    preset: str | None = None
    image_size: tuple[int, int] | None = None
    resize: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    skip_bad_images: bool = False
    #: ``--mean`` / ``--std`` (pixels in [0, 1]): override the preset's or pretrained_cfg's
    mean: tuple | None = None
    std: tuple | None = None

    @classmethod
    def from_options(cls, preprocess=None, image_size=None, resize=None, crop_pct=None, interpolation=None,
                     skip_bad_images=False, mean=None, std=None) -> "Preprocess":
        """Validate the option values (each error names its option) and build the spec."""
        if preprocess is not None and str(preprocess) not in PRESETS:
            raise NormswapError(f"--preprocess {preprocess!r}: expected one of {', '.join(PRESETS)}")
        if interpolation is not None and str(interpolation) not in INTERPOLATIONS:
            raise NormswapError(f"--interpolation {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
        size = parse_image_size(image_size)
        rsz = None if resize is None else _positive_int(resize, "--resize", 2 * MAX_SIDE)
        pct = None
        if crop_pct is not None:
            try:
                pct = float(crop_pct)
            except (TypeError, ValueError):
                raise NormswapError(f"--crop-pct {crop_pct!r}: expected a number in (0, 1]") from None
            if not 0 < pct <= 1:
                raise NormswapError(f"--crop-pct {crop_pct!r}: expected a number in (0, 1]")
        if rsz is not None and pct is not None:
            raise NormswapError("--resize and --crop-pct both set the resize before the crop: give one")
        if preprocess == "tf-lite" and rsz is not None:
            raise NormswapError("--resize does not apply to --preprocess tf-lite (it crops before resizing); "
                                "use --crop-pct")
        return cls(preprocess, size, rsz, pct, interpolation, bool(skip_bad_images),
                   parse_channel_values(mean, "--mean"), parse_channel_values(std, "--std", positive=True))

    @classmethod
    def coerce(cls, spec) -> "Preprocess":
        """None / a preset name / a Preprocess -> Preprocess."""
        if spec is None:
            return cls()
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            return cls.from_options(preprocess=spec)
        if isinstance(spec, dict):
            return cls.from_options(**spec)
        raise NormswapError(f"preprocess: expected a preset name or a Preprocess, got {type(spec).__name__}")

    def resolve(self, model=None, input_shape=None, *, source: str = "") -> "ImageTransform":
        """The concrete transform for ``model`` (its ``pretrained_cfg``, its first layer's input
        channels) and ``input_shape`` (N,C,H,W: channels, and the size when none is given)."""
        cfg = _pretrained_cfg(model) if self.preset is None else None
        size = self.image_size
        shape_hw = tuple(int(d) for d in input_shape[2:]) if input_shape is not None and len(input_shape) == 4 else None
        if input_shape is not None and len(input_shape) != 4:
            raise NormswapError(f"{source or 'image folder'}: images feed N,C,H,W inputs, but --input-shape "
                                f"has {len(input_shape)} dimensions")
        if size is not None and shape_hw is not None and size != shape_hw:
            raise NormswapError(f"--image-size {size[0]},{size[1]} disagrees with --input-shape "
                                f"{','.join(map(str, input_shape))}")
        size = size or shape_hw
        channels = _channels(model, input_shape, cfg, source)
        if cfg is not None:
            return self._normalised(_from_cfg(self, cfg, size, channels), channels)
        preset = self.preset or "none"
        if size is None:
            if preset == "none":
                raise NormswapError(f"{source or 'an image folder'}: an image folder needs --input-shape N,C,H,W "
                                    "or --image-size (or a --preprocess preset) to know the size")
            size = (DEFAULT_SIZE[preset],) * 2
        return self._normalised(_from_preset(self, preset, size, channels), channels)

    def _normalised(self, t: "ImageTransform", channels: int) -> "ImageTransform":
        """``--mean`` / ``--std`` in place of the transform's own (one value: every channel)."""
        if self.mean is None and self.std is None:
            return t
        import dataclasses

        def per_channel(v, old):
            if v is None:
                return old
            return v * channels if len(v) == 1 else (v if channels == 3 else (sum(v) / 3,))

        base = "--preprocess none" if t.source.startswith("default") else t.source  # said, not defaulted
        explicit = base + " with " + " and ".join(o for o, v in (("--mean", self.mean), ("--std", self.std)) if v)
        return dataclasses.replace(t, mean=per_channel(self.mean, t.mean), std=per_channel(self.std, t.std),
                                   source=explicit)


def _pretrained_cfg(model) -> dict | None:
    for name in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, name, None) if model is not None else None
        if isinstance(cfg, dict) and cfg.get("input_size") and cfg.get("mean") and cfg.get("std"):
            return cfg
    return None


def _channels(model, input_shape, cfg, source: str) -> int:
    if input_shape is not None:
        c = int(input_shape[1])
    elif cfg is not None:
        c = int(cfg["input_size"][0])
    else:
        from normswap.dataset import guess_input_shape

        guess = guess_input_shape(model) if model is not None else None
        c = int(guess[1]) if guess is not None and len(guess) == 4 else 3
    if c not in (1, 3):
        raise NormswapError(f"{source or 'image folder'}: images can feed 1- or 3-channel inputs, the model takes {c}")
    return c


def _check_resize(resize, what: str, pct: float) -> None:
    """The resize a crop fraction implies stays within the limit on ``--resize``."""
    side = max(resize) if isinstance(resize, tuple) else resize
    if side > 2 * MAX_SIDE:
        raise NormswapError(f"{what} {pct:g}: the resize before the crop would be {side} pixels, more than "
                            f"{2 * MAX_SIDE}; use a larger crop fraction")


def _from_preset(p: Preprocess, preset: str, size: tuple[int, int], channels: int) -> "ImageTransform":
    short = min(size)
    interp = p.interpolation or ("bicubic" if preset == "tf-lite" else "bilinear")
    if preset == "tf-lite":
        frac = p.crop_pct or short / (short + TF_CROP_PADDING)
        return ImageTransform("tf-lite", size, channels, "crop-resize", None, frac, (127 / 255,) * 3,
                              (128 / 255,) * 3, interp, "--preprocess tf-lite")
    mean, std = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": ((0.5,) * 3, (0.5,) * 3),
                 "none": ((0.0,) * 3, (1.0,) * 3)}[preset]
    src = f"--preprocess {preset}" if p.preset else "default (no --preprocess)"
    if preset == "none" and p.resize is None and p.crop_pct is None:
        return ImageTransform("none", size, channels, "resize", None, None, mean, std, interp, src)
    pct = p.crop_pct or DEFAULT_CROP_PCT
    resize = p.resize or (round(size[0] / pct) if size[0] == size[1] else
                          (round(size[0] / pct), round(size[1] / pct)))
    _check_resize(resize, "--crop-pct", pct)
    return ImageTransform(preset, size, channels, "resize-crop", resize, None, mean, std, interp, src)


def _from_cfg(p: Preprocess, cfg: dict, size, channels: int) -> "ImageTransform":
    """timm's eval transform (``transforms_imagenet_eval``): scale = floor(size / crop_pct)."""
    size = size or (int(cfg["input_size"][-2]), int(cfg["input_size"][-1]))
    pct = p.crop_pct or float(cfg.get("crop_pct") or DEFAULT_CROP_PCT)
    interp = p.interpolation or (cfg.get("interpolation") if cfg.get("interpolation") in INTERPOLATIONS
                                 else "bilinear")
    scale = (math.floor(size[0] / pct), math.floor(size[1] / pct))
    mode = cfg.get("crop_mode") or "center"
    notes = [] if mode in ("center", "squash") else [f"crop_mode {mode!r} read as 'center'"]
    resize = p.resize or (scale[0] if scale[0] == scale[1] and mode != "squash" else scale)
    _check_resize(resize, "--crop-pct" if p.crop_pct else "the model's pretrained_cfg crop_pct", pct)
    geometry = "squash-crop" if mode == "squash" and p.resize is None else "resize-crop"
    return ImageTransform("pretrained_cfg", size, channels, geometry, resize, None, tuple(cfg["mean"]),
                          tuple(cfg["std"]), interp, "the model's pretrained_cfg", notes)


@dataclass(frozen=True)
class ImageTransform:
    """A concrete image -> array transform.

    ``geometry``: ``resize`` (to H x W), ``resize-crop`` (``resize`` an int: shorter side to it,
    torchvision's rule; a pair: the smallest size keeping the aspect ratio that covers it; then a
    centre crop to H x W), ``squash-crop`` (resize to the ``resize`` pair, then centre crop) or
    ``crop-resize`` (centre crop ``crop_fraction`` of the shorter side, then resize)."""

    name: str
    size: tuple[int, int]
    channels: int
    geometry: str
    resize: Any
    crop_fraction: float | None
    mean: tuple
    std: tuple
    interpolation: str
    source: str
    notes: list = field(default_factory=list)

    def __post_init__(self):
        if self.channels == 1 and len(self.mean) == 3:  # grayscale: one mean/std for the one channel
            object.__setattr__(self, "mean", (sum(self.mean) / 3,))
            object.__setattr__(self, "std", (sum(self.std) / 3,))

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    def with_size(self, size) -> "ImageTransform":
        return replace(self, size=tuple(size))

    def __call__(self, im):
        """PIL image -> float32 array (C, H, W)."""
        import torch

        return self.normalize(torch.from_numpy(self.pixels(im))[None])[0].numpy()

    def pixels(self, im):
        """PIL image -> uint8 array (H, W, C): mode, resize and crop, not yet normalised."""
        import numpy as np

        im = self.geometry_of(_to_mode(im, "L" if self.channels == 1 else "RGB"))
        a = np.asarray(im, dtype=np.uint8)
        return a[:, :, None] if a.ndim == 2 else a

    def normalize(self, pixels):
        """uint8 tensor (B, H, W, C) -> float32 (B, C, H, W): ``(pixels / 255 - mean) / std``."""
        import torch

        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        x = pixels.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        return x.sub_(mean).div_(std).contiguous()

    def work_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) of the largest image the resize / crop steps make from a w x h image."""
        th, tw = self.size
        if self.geometry == "resize-crop":
            rw, rh = resized_size(w, h, self.resize, self.geometry)
            return max(rw, tw), max(rh, th)
        if self.geometry == "squash-crop":
            return max(self.resize[1], tw), max(self.resize[0], th)
        return tw, th  # resize: the target; crop-resize: a crop of the image, then the target

    def check_size(self, w: int, h: int) -> str | None:
        """Why a w x h image is not read (None: it is): an image so elongated that resizing its
        shorter side would make more than MAX_WORK_PIXELS, or 4x what a square image makes when the
        options ask for more (a 1 x 8000 strip resized by its shorter side to 256 x 2048000)."""
        ww, wh = self.work_size(w, h)
        sw, sh = self.work_size(1, 1)  # a square image: what the options themselves ask for
        limit = max(MAX_WORK_PIXELS, 4 * sw * sh)
        if ww * wh > limit:
            return (f"{w}x{h} pixels: the resize before the crop would make it {ww}x{wh}, more than "
                    f"{limit} pixels")
        return None

    def geometry_of(self, im):
        """The resize / crop steps on a PIL image (already in the right mode)."""
        from PIL import Image

        f = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
             "lanczos": Image.LANCZOS}[self.interpolation]
        h, w = self.size
        if self.geometry == "resize":
            return im.resize((w, h), f)
        if self.geometry == "crop-resize":
            return im.crop(tf_crop_box(im.width, im.height, h, w, self.crop_fraction)).resize((w, h), f)
        return center_crop(im.resize(resized_size(im.width, im.height, self.resize, self.geometry), f), h, w)

    def describe(self) -> str:
        """One line: geometry, filter and the normalisation in pixel units (0-255)."""
        h, w = self.size
        if self.geometry == "resize":
            geo = f"resize to {h}x{w}"
        elif self.geometry == "crop-resize":
            geo = f"centre crop {self.crop_fraction:.4g} of the shorter side, resize to {h}x{w}"
        else:
            r = self.resize if isinstance(self.resize, int) else "x".join(map(str, self.resize))
            geo = f"resize {'shorter side ' if isinstance(self.resize, int) else ''}to {r}, centre crop {h}x{w}"
        gray = ", grayscale" if self.channels == 1 else ""
        mean = "/".join(f"{255 * v:.4g}" for v in self.mean)
        std = "/".join(f"{255 * v:.4g}" for v in self.std)
        return f"{self.name} ({self.source}): {geo} ({self.interpolation}{gray}), (pixel - {mean}) / {std}"

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "size": list(self.size), "channels": self.channels,
                "geometry": self.geometry, "resize": self.resize, "crop_fraction": self.crop_fraction,
                "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
                "description": self.describe(), "notes": list(self.notes)}


def _to_mode(im, mode: str):
    """Convert to L / RGB; 16-bit and float images are scaled to 8 bits first (not clipped)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np
        from PIL import Image

        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(np.rint(a * 255.0 / top), 0, 255).astype(np.uint8), "L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im if im.mode == mode else im.convert(mode)


def resized_size(w: int, h: int, resize, geometry: str = "resize-crop") -> tuple[int, int]:
    """(width, height) after the resize step: an int sets the shorter side (torchvision: the
    longer one is truncated); a pair is a size to cover keeping the aspect ratio (timm's
    ResizeKeepRatio), or, for ``squash-crop``, the exact size."""
    if isinstance(resize, int):
        if w <= h:
            return resize, int(resize * h / w)
        return int(resize * w / h), resize
    th, tw = resize
    if geometry == "squash-crop":
        return tw, th
    ratio = min(h / th, w / tw)
    return max(1, round(w / ratio)), max(1, round(h / ratio))


def center_crop(im, h: int, w: int):
    """torchvision's CenterCrop: offsets ``round((size - crop) / 2)``, zero padding if too small."""
    if im.width < w or im.height < h:
        from PIL import Image

        pad = Image.new(im.mode, (max(w, im.width), max(h, im.height)), 0)
        pad.paste(im, ((pad.width - im.width) // 2, (pad.height - im.height) // 2))
        im = pad
    top = int(round((im.height - h) / 2.0))
    left = int(round((im.width - w) / 2.0))
    return im.crop((left, top, left + w, top + h))


def tf_crop_box(w: int, h: int, th: int, tw: int, fraction: float) -> tuple[int, int, int, int]:
    """TF EfficientNet's ``_decode_and_center_crop``: a centre crop of ``fraction`` of the
    shorter side (``int`` truncation; offsets ``(size - crop + 1) // 2``), with the target's
    aspect ratio when it is not square."""
    side = min(h, w)
    ch = max(1, int(fraction * side * (th / max(th, tw) if th != tw else 1)))
    cw = max(1, int(fraction * side * (tw / max(th, tw) if th != tw else 1)))
    top, left = (h - ch + 1) // 2, (w - cw + 1) // 2
    return left, top, left + cw, top + ch
