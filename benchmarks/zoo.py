"""The real-library zoo: audit, fold and convert on real torchvision / timm / Hugging Face models.

Every model is built with random initialisation (no hub, no download: ``weights=None``,
``pretrained=False``, ``AutoModel.from_config``), its norms get non-trivial affine parameters
(gamma in [0.5, 1.5], beta in [-0.3, 0.3]) and realistic BatchNorm statistics from three
training-mode forward passes on random inputs (cumulative running averages), and it is put in
eval mode.  Then, per model:

* ``normswap.audit(model, inputs)``: norm sites by kind;
* ``normswap.fold(model, inputs)``: folded / total BatchNorm-like sites (kinds whose fold family
  is ``bn_like``: BatchNorm, FrozenBatchNorm, timm BatchNormAct2d, functional batch_norm, ...);
  the folded model's outputs are compared with the original's here (not only by fold's own
  verification): a *wrong* fold (error above ``1e-4 * (1 + max|y|)``) is reported as WRONG;
  audit's foldable count is compared with fold's;
* for every model with a BatchNorm: ``normswap.convert(model, "gn", calib=16 inputs,
  mode="fast")``; the converted model must have no site of the converted kinds left and a finite
  forward; with ``--export`` it is also exported with ``normswap.export`` (to a temporary file).

The libraries are optional: a library that is not installed is reported as such.  They need a
separate environment (``benchmarks/zoo_results.md`` has the recipe); run with the repository on
``PYTHONPATH``::

    OMP_NUM_THREADS=1 PYTHONPATH=. /work/venv-zoo/bin/python benchmarks/zoo.py [--export]
        [--only tv_resnet18,timm_*] [--lib torchvision,timm,hf] [--mode fast|sequential]
        [--json FILE] [--md FILE]

Calibration inputs: 16 photographs of ``shared/imagenet-sample`` (resized to 64x64, ImageNet
normalisation) when that folder and Pillow are present, else random normal inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

IMG = (3, 64, 64)
TOKENS = 8
VOCAB = 128
CALIB_N = 16
BATCH = 2


# ============================================================================ the architectures

@dataclass
class Entry:
    name: str
    lib: str  # torchvision / timm / hf
    build: Callable[[], nn.Module]
    kind: str = "image"  # image / tokens
    size: int = 64  # image side


def _tv(fn: str, **kw) -> Callable[[], nn.Module]:
    def build():
        import importlib
        mod, _, name = f"torchvision.models.{fn}".rpartition(".")
        return getattr(importlib.import_module(mod), name)(weights=None, **kw)
    return build


def _tv_fpn(backbone: str) -> Callable[[], nn.Module]:
    def build():  # detection backbone: FrozenBatchNorm2d, OrderedDict output
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
        return resnet_fpn_backbone(backbone_name=backbone, weights=None, trainable_layers=5)
    return build


def _timm(name: str, **kw) -> Callable[[], nn.Module]:
    def build():
        import timm
        return timm.create_model(name, pretrained=False, **kw)
    return build


def _hf(config_cls: str, auto: str = "AutoModel", **kw) -> Callable[[], nn.Module]:
    def build():
        import transformers
        cfg = getattr(transformers, config_cls)(**kw)
        return getattr(transformers, auto).from_config(cfg)
    return build


_TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64)

ZOO: list[Entry] = [
    # ---- torchvision
    Entry("tv_resnet18", "torchvision", _tv("resnet18")),
    Entry("tv_resnet50", "torchvision", _tv("resnet50")),
    Entry("tv_mobilenet_v2", "torchvision", _tv("mobilenet_v2")),
    Entry("tv_mobilenet_v3_small", "torchvision", _tv("mobilenet_v3_small")),
    Entry("tv_efficientnet_b0", "torchvision", _tv("efficientnet_b0")),
    Entry("tv_regnet_y_400mf", "torchvision", _tv("regnet_y_400mf")),
    Entry("tv_densenet121", "torchvision", _tv("densenet121")),
    Entry("tv_shufflenet_v2_x0_5", "torchvision", _tv("shufflenet_v2_x0_5")),
    Entry("tv_mnasnet0_5", "torchvision", _tv("mnasnet0_5")),
    Entry("tv_convnext_tiny", "torchvision", _tv("convnext_tiny")),
    Entry("tv_squeezenet1_1", "torchvision", _tv("squeezenet1_1")),
    Entry("tv_vgg11_bn", "torchvision", _tv("vgg11_bn")),
    Entry("tv_googlenet", "torchvision", _tv("googlenet", aux_logits=False, init_weights=False)),
    Entry("tv_inception_v3", "torchvision", _tv("inception_v3", aux_logits=False, init_weights=False), size=80),
    Entry("tv_fcn_resnet50", "torchvision", _tv("segmentation.fcn_resnet50", weights_backbone=None, num_classes=5)),
    Entry("tv_resnet18_fpn_frozen_bn", "torchvision", _tv_fpn("resnet18")),
    # ---- timm
    Entry("timm_efficientnet_b0", "timm", _timm("efficientnet_b0")),
    Entry("timm_tf_efficientnet_lite0", "timm", _timm("tf_efficientnet_lite0")),
    Entry("timm_mobilenetv3_small", "timm", _timm("mobilenetv3_small_100")),
    Entry("timm_tf_mobilenetv3_small", "timm", _timm("tf_mobilenetv3_small_100")),
    Entry("timm_resnet50d", "timm", _timm("resnet50d")),
    Entry("timm_resnetv2_50", "timm", _timm("resnetv2_50")),
    Entry("timm_regnety_002", "timm", _timm("regnety_002")),
    Entry("timm_nf_resnet26", "timm", _timm("nf_resnet26")),
    Entry("timm_convnext_atto", "timm", _timm("convnext_atto")),
    Entry("timm_cspresnet50", "timm", _timm("cspresnet50")),
    Entry("timm_ghostnet_100", "timm", _timm("ghostnet_100")),
    Entry("timm_mobilevit_xxs", "timm", _timm("mobilevit_xxs")),
    Entry("timm_resnetv2_50d_frn", "timm", _timm("resnetv2_50d_frn")),
    Entry("timm_resnetv2_50d_evos", "timm", _timm("resnetv2_50d_evos")),
    Entry("timm_dla34", "timm", _timm("dla34")),
    Entry("timm_hrnet_w18_small", "timm", _timm("hrnet_w18_small")),
    Entry("timm_repvgg_a0", "timm", _timm("repvgg_a0")),
    Entry("timm_levit_128s", "timm", _timm("levit_128s", img_size=64)),
    Entry("timm_rexnet_100", "timm", _timm("rexnet_100")),
    Entry("timm_lcnet_050", "timm", _timm("lcnet_050")),
    Entry("timm_mixnet_s", "timm", _timm("mixnet_s")),
    Entry("timm_mobilenetv3_features_fx", "timm", _timm("mobilenetv3_small_100", features_only=True,
                                                        feature_cls="fx")),
    # ---- Hugging Face transformers
    Entry("hf_bert", "hf", _hf("BertConfig", **_TEXT), kind="tokens"),
    Entry("hf_gpt2", "hf", _hf("GPT2Config", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                               use_cache=False), kind="tokens"),
    Entry("hf_llama", "hf", _hf("LlamaConfig", **_TEXT, num_key_value_heads=1, use_cache=False),
          kind="tokens"),
    Entry("hf_vit", "hf", _hf("ViTConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, image_size=64, patch_size=16)),
    Entry("hf_swin", "hf", _hf("SwinConfig", image_size=64, patch_size=4, embed_dim=16, depths=[1, 1],
                               num_heads=[1, 2], window_size=4)),
    Entry("hf_convnext", "hf", _hf("ConvNextConfig", hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])),
    Entry("hf_resnet", "hf", _hf("ResNetConfig", embedding_size=16, hidden_sizes=[32, 64, 128, 256],
                                 depths=[1, 1, 1, 1])),
    Entry("hf_mobilenet_v2", "hf", _hf("MobileNetV2Config", depth_multiplier=0.35, image_size=64)),
    Entry("hf_efficientnet", "hf", _hf("EfficientNetConfig", width_coefficient=1.0, depth_coefficient=1.0,
                                       hidden_dim=1280, image_size=64)),
    Entry("hf_regnet", "hf", _hf("RegNetConfig", embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                                 depths=[1, 1, 1, 1], groups_width=8)),
    Entry("hf_mobilevit", "hf", _hf("MobileViTConfig", image_size=64, hidden_sizes=[32, 48, 64],
                                    neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 160])),
    Entry("hf_levit", "hf", _hf("LevitConfig", image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2],
                                depths=[1, 1, 1], key_dim=[8, 8, 8])),
    Entry("hf_mobilenet_v1", "hf", _hf("MobileNetV1Config", depth_multiplier=0.25, image_size=64)),
    Entry("hf_rtdetr_resnet_backbone", "hf", _hf("RTDetrResNetConfig", embedding_size=16, hidden_sizes=[32, 64, 128, 256],
                                                 depths=[1, 1, 1, 1], out_features=["stage2", "stage4"],
                                                 auto="AutoBackbone")),
    Entry("hf_bit", "hf", _hf("BitConfig", embedding_size=32, hidden_sizes=[128, 256, 512, 1024],
                              depths=[1, 1, 1, 1])),
]

LIB_MODULES = {"torchvision": "torchvision", "timm": "timm", "hf": "transformers"}


# ============================================================================ preparing a model

def _inputs(entry: Entry, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    if entry.kind == "tokens":
        return (torch.randint(0, VOCAB, (n, TOKENS), generator=g),)
    return (torch.randn((n, IMG[0], entry.size, entry.size), generator=g),)


def _norm_modules(model: nn.Module):
    from normswap.norms import classify
    for m in model.modules():
        if classify(m) is not None:
            yield m


def prepare(model: nn.Module, entry: Entry, seed: int = 0) -> nn.Module:
    """Non-trivial norm affines and BatchNorm statistics from 3 training-mode passes, then eval."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in _norm_modules(model):
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(w, nn.Parameter) and w.dim() == 1:
                w.copy_(torch.rand(w.shape, generator=g) + 0.5)
            if isinstance(b, nn.Parameter) and b.dim() == 1:
                b.copy_((torch.rand(b.shape, generator=g) - 0.5) * 0.6)
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):  # frozen BatchNorm: buffers only
                rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
                if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor) and rm.is_floating_point():
                    rm.copy_((torch.rand(rm.shape, generator=g) - 0.5) * 0.6)
                    rv.copy_(torch.rand(rv.shape, generator=g) * 1.5 + 0.5)
                    for t in (w, b):
                        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.shape == rm.shape:
                            t.copy_(torch.rand(t.shape, generator=g) + 0.5 if t is w else (rm * 0.5))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(*_inputs(entry, 4, seed + 10 + i))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return model.eval()


def calibration_inputs(entry: Entry, n: int = CALIB_N) -> tuple[torch.Tensor, str]:
    """``n`` photographs of shared/imagenet-sample (resized, ImageNet-normalised), else random."""
    folder = _REPO.parent / "shared" / "imagenet-sample"
    if not folder.is_dir():
        folder = Path("/work/shared/imagenet-sample")
    files = sorted(folder.glob("*.jpg"))[: n * 8: 8] if folder.is_dir() else []
    if len(files) == n:
        try:
            from PIL import Image
            mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
            xs = []
            for f in files:
                im = Image.open(f).convert("RGB").resize((entry.size, entry.size), Image.BILINEAR)
                t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
                t = t.view(entry.size, entry.size, 3).permute(2, 0, 1).float() / 255
                xs.append((t - mean) / std)
            return torch.stack(xs), "photos"
        except Exception:  # noqa: BLE001 - no Pillow: random inputs
            pass
    return _inputs(entry, n, 1234)[0], "random"


# ============================================================================ the checks

def _flat(out) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten
    if hasattr(out, "to_tuple"):  # Hugging Face ModelOutput
        out = out.to_tuple()
    return [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]


def compare(ref, out) -> tuple[float, float, bool]:
    """(max abs error, max |ref|, ok) over the floating outputs; ok: within 1e-4 * (1 + max|ref|)."""
    a_s, b_s = _flat(ref), _flat(out)
    if len(a_s) != len(b_s):
        return math.inf, 0.0, False
    err = scale = 0.0
    ok = True
    for a, b in zip(a_s, b_s):
        if a.shape != b.shape:
            return math.inf, 0.0, False
        if not a.is_floating_point():
            ok = ok and bool(torch.equal(a, b))
            continue
        a, b = a.double(), b.double()
        fin = torch.isfinite(a)
        if not torch.equal(fin, torch.isfinite(b)):
            return math.inf, 0.0, False
        if fin.any():
            err = max(err, float((a[fin] - b[fin]).abs().max()))
            scale = max(scale, float(a[fin].abs().max()))
    return err, scale, ok and err <= 1e-4 * (1 + scale)


def exact_in_float64(model: nn.Module, x: tuple, ok32: bool, folded: int) -> tuple[float | None, bool]:
    """Fold a float64 copy and compare in float64: a correct fold then agrees to ~1e-12 relative,
    so float32 rounding (amplified through a deep random network) cannot hide a wrong fold, nor
    pass for one.  Returns (relative error, ok); without a float64 run that folds the same number
    of sites as the float32 one, the float32 verdict."""
    import normswap
    from normswap.fold.api import deepcopy_model  # keeps every module's train/eval mode

    try:
        m64 = deepcopy_model(model).double()
        x64 = tuple(t.double() if t.is_floating_point() else t for t in x)
        with torch.no_grad():
            ref = m64(*x64)
        f64, rep = normswap.fold(m64, x64)
        with torch.no_grad():
            out = f64(*x64)
    except Exception:  # noqa: BLE001 - the model does not run in float64
        return None, ok32
    if len(rep.folded) != folded:
        return None, ok32
    err, scale, _ = compare(ref, out)
    rel = err / (1 + scale)
    return rel, rel <= 1e-9


def _bn_like(kind: str) -> bool:
    from normswap.norms import NORMS
    k = NORMS.get(kind[len("functional_"):] if kind.startswith("functional_") else kind)
    return k is not None and k.fold_family == "bn_like" and k.name != "in"


@dataclass
class Row:
    name: str
    lib: str
    status: str = "ok"  # ok / skipped (library missing) / error
    norms: dict = field(default_factory=dict)  # audit: kind -> count
    bn_like: int = 0
    folded: int = 0
    folded_all: int = 0
    sites: int = 0
    audit_foldable: int | None = None
    fold_err: float | None = None
    fold_scale: float | None = None
    fold_ok: bool | None = None
    fold64_err: float | None = None  # relative, folded and compared in float64
    fold_error: str | None = None
    convert: str = "n/a"  # n/a (no BatchNorm) / ok / FAIL
    convert_error: str | None = None
    convert_layers: int = 0
    convert_agree: float | None = None
    export: str = "n/a"
    export_error: str | None = None
    skipped_reasons: dict = field(default_factory=dict)
    seconds: float = 0.0


def _exc(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text[:300]


def run_entry(entry: Entry, *, do_export: bool, calib: str, mode: str = "fast") -> Row:
    import normswap
    from normswap.convert.kinds import DEFAULT_SOURCES
    from normswap.norms import iter_norms

    row = Row(entry.name, entry.lib)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = prepare(entry.build(), entry)
    x = _inputs(entry, BATCH, 7)
    with torch.no_grad():
        ref = model(*x)
    # audit
    rep = normswap.audit(model, x)
    for s in rep.sites:
        row.norms[s.kind] = row.norms.get(s.kind, 0) + 1
    audit_foldable = sum(1 for s in rep.sites if s.foldable and _bn_like(s.kind))
    row.audit_foldable = audit_foldable
    # fold
    try:
        folded, frep = normswap.fold(model, x)
        bn_folded = [f for f in frep.folded if _bn_like(f["kind"])]
        bn_skipped = [s for s in frep.skipped if _bn_like(s["kind"])]
        row.bn_like = len(bn_folded) + len(bn_skipped)
        row.folded = len(bn_folded)
        row.folded_all = len(frep.folded)
        row.sites = len(frep.folded) + len(frep.skipped)
        for s in frep.skipped:
            key = f"{s['kind']}: {s['reason']}"[:160]
            row.skipped_reasons[key] = row.skipped_reasons.get(key, 0) + 1
        with torch.no_grad():
            out = folded(*x)
        row.fold_err, row.fold_scale, row.fold_ok = compare(ref, out)
        del folded
        row.fold64_err, row.fold_ok = exact_in_float64(model, x, row.fold_ok, row.folded_all)
    except Exception as e:  # noqa: BLE001
        row.fold_error = _exc(e)
        row.fold_ok = False
    # convert (every model with a BatchNorm-like module of convert's default sources)
    has_bn = any(k in DEFAULT_SOURCES for _, _, k in iter_norms(model))
    if has_bn:
        try:
            cx, row_calib = calibration_inputs(entry) if calib == "photos" else (_inputs(entry, CALIB_N, 99)[0], "random")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                conv, crep = normswap.convert(model, "gn", calib=cx, mode=mode, batch_size=8)
            left = [(n, k) for n, _, k in iter_norms(conv) if k in crep.sources]
            if left:
                raise AssertionError(f"{len(left)} {left[0][1]} site(s) left, e.g. {left[0][0]}")
            with torch.no_grad():
                y = conv(*x)
            if not all(torch.isfinite(t).all() for t in _flat(y) if t.is_floating_point()):
                raise AssertionError("the converted model's output is not finite")
            row.convert = "ok"
            row.convert_layers = len(crep.layers)
            fid = crep.fidelity
            agree = getattr(fid, "top1_agreement", None) if fid is not None else None
            row.convert_agree = float(agree) if agree is not None else None
            if do_export:
                try:
                    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()):
                        erep = normswap.export(conv, Path(d) / "m.onnx", x)
                    row.export = "ok" if erep.passed else "FAIL"
                    if erep.fallback_reason:
                        row.export_error = f"fallback: {erep.fallback_reason}"[:300]
                except Exception as e:  # noqa: BLE001
                    row.export, row.export_error = "FAIL", _exc(e)
        except Exception as e:  # noqa: BLE001
            row.convert, row.convert_error = "FAIL", _exc(e)
            if os.environ.get("ZOO_DEBUG"):
                traceback.print_exc()
    row.seconds = time.perf_counter() - t0
    return row


# ============================================================================ output

def _fmt_err(r: Row) -> str:
    if r.fold_error:
        return "ERROR"
    if r.fold_err is None:
        return "-"
    return f"{r.fold_err / (1 + (r.fold_scale or 0.0)):.0e}"


def table(rows: list[Row]) -> str:
    """At most 80 columns: architecture | BN-like | folded | fold error relative to 1 + max|y| in
    float32 and in float64 (WRONG: the float64 fold is not exact) | convert | export."""
    head = (f"{'architecture':<28} {'BN-like':>7} {'folded':>6} {'err f32':>7} {'err f64':>7} "
            f"{'convert':>7} {'export':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.status != "ok":
            lines.append(f"{r.name:<28} {r.status}"[:80])
            continue
        e64 = "-" if r.fold64_err is None else f"{r.fold64_err:.0e}"
        if r.fold_ok is False:
            e64 = "WRONG"
        lines.append(f"{r.name[:28]:<28} {r.bn_like:>7} {r.folded:>6} {_fmt_err(r):>7} {e64:>7} "
                     f"{r.convert:>7} {r.export:>6}")
    ok = [r for r in rows if r.status == "ok"]
    bn = sum(r.bn_like for r in ok)
    fo = sum(r.folded for r in ok)
    conv = [r for r in ok if r.convert != "n/a"]
    lines.append("-" * len(head))
    lines.append(f"{len(ok)} models; BN-like folded {fo}/{bn} ({100 * fo / max(bn, 1):.1f} %); "
                 f"wrong folds {sum(1 for r in ok if r.fold_ok is False)}; "
                 f"convert ok {sum(1 for r in conv if r.convert == 'ok')}/{len(conv)}")
    return "\n".join(lines)


def failures(rows: list[Row]) -> str:
    out = []
    for r in rows:
        for what, err in (("fold", r.fold_error), ("convert", r.convert_error), ("export", r.export_error)):
            if err:
                out.append(f"- {r.name} {what}: {err}")
        if r.fold_ok is False and not r.fold_error:
            out.append(f"- {r.name} fold: WRONG model, max |diff| {r.fold_err:.3g} (max |y| {r.fold_scale:.3g}), "
                       f"float64 relative error {r.fold64_err}")
    return "\n".join(out) or "(none)"


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for lib, mod in LIB_MODULES.items():
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            v[mod] = None
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            v[mod] = None
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated names or globs (e.g. tv_resnet18,timm_*)")
    ap.add_argument("--lib", help="comma-separated libraries: torchvision,timm,hf")
    ap.add_argument("--export", action="store_true", help="also export each converted model to ONNX")
    ap.add_argument("--calib", choices=("photos", "random"), default="photos")
    ap.add_argument("--mode", choices=("fast", "sequential"), default="fast",
                    help="convert's calibration mode (default fast)")
    ap.add_argument("--json", help="write the rows as JSON to this file ('-': stdout)")
    ap.add_argument("--md", help="write the results as markdown to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    entries = ZOO
    if args.lib:
        libs = set(args.lib.split(","))
        entries = [e for e in entries if e.lib in libs]
    if args.only:
        pats = args.only.split(",")
        entries = [e for e in entries if any(fnmatch.fnmatch(e.name, p) for p in pats)]
    have = {}
    rows = []
    for e in entries:
        if e.lib not in have:
            try:
                __import__(LIB_MODULES[e.lib])
                have[e.lib] = True
            except Exception:  # noqa: BLE001
                have[e.lib] = False
        if not have[e.lib]:
            rows.append(Row(e.name, e.lib, status=f"skipped: {LIB_MODULES[e.lib]} not installed"))
            continue
        try:
            row = run_entry(e, do_export=args.export, calib=args.calib, mode=args.mode)
        except Exception as ex:  # noqa: BLE001 - building / preparing the model itself failed
            row = Row(e.name, e.lib, status=f"error: {_exc(ex)}"[:60])
        rows.append(row)
        print(f"[{len(rows)}/{len(entries)}] {row.name}: {row.seconds:.1f} s", file=sys.stderr, flush=True)
    text = table(rows)
    if args.json == "-":
        print(json.dumps({"versions": versions(), "rows": [asdict(r) for r in rows]}, indent=1))
    else:
        print(text)
        print("\nfailures:\n" + failures(rows))
    if args.json and args.json != "-":
        Path(args.json).write_text(json.dumps({"versions": versions(), "rows": [asdict(r) for r in rows]}, indent=1))
    if args.md:
        v = versions()
        md = ["# Real-library zoo results", "",
              "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()), "",
              "```", text, "```", "", "Failures:", "", failures(rows), ""]
        Path(args.md).write_text("\n".join(md))
    bad = any(r.fold_ok is False or r.convert == "FAIL" for r in rows if r.status == "ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
