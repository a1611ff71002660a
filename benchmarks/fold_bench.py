"""Benchmark ``normswap.fold`` against torch's folding tools; prints markdown tables.

Anchors: ``torch.fx.experimental.optimization.fuse`` (FX pattern fuser) and, where it applies,
``torch.ao.quantization.fuse_modules`` (needs the (layer, norm) name pairs; we give it the
pairs it supports, taken from the model structure).

1. Per model (ResNet-50-shaped ``samples.models.resnet50_like``, the MobileNet-style and
   ConvTranspose samples): sites folded by each tool, max output error against the unfolded
   float32 model, time to fold (median) and the ratio to the FX fuser.
2. Scaling: time to fold a deep conv-BN-ReLU chain of 50 ... 1000 norm layers (normswap pauses
   Python's cyclic GC while it folds: full collections scan every live object and made both
   tools superlinear; the FX fuser runs with the GC as usual).
3. CPU inference latency (``torch.set_num_threads``; interleaved runs, median): unfolded vs
   folded vs the same architecture built without any BatchNorm (convs with bias): the limit.

Usage: ``python benchmarks/fold_bench.py [--threads 1] [--quick]``.  The machine may be shared:
timings are medians of interleaved repeats; rerun to see the noise.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from normswap.fold import fold  # noqa: E402
from samples.models import ALL_SAMPLES, randomize_norm_stats, resnet50_like  # noqa: E402

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FUSE_PAIRS = {
    (nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d),
    (nn.Linear, nn.BatchNorm1d), (nn.ConvTranspose1d, nn.BatchNorm1d),
    (nn.ConvTranspose2d, nn.BatchNorm2d), (nn.ConvTranspose3d, nn.BatchNorm3d),
}


# --------------------------------------------------------------------------- tools


def tool_normswap(model):
    return fold(model)[0]


def tool_fx(model):
    from torch.fx.experimental.optimization import fuse

    return fuse(model)


def fuse_modules_pairs(model: nn.Module) -> list[list[str]]:
    """The [layer, bn] name pairs fuse_modules supports: a BN directly after a layer, found by
    tracing (the list a user would have to write by hand)."""
    gm = torch.fx.symbolic_trace(model)
    mods = dict(model.named_modules())
    pairs = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(mods.get(n.target), BN_TYPES):
            a = n.args[0]
            if isinstance(a, torch.fx.Node) and a.op == "call_module":
                if (type(mods[a.target]), type(mods[n.target])) in FUSE_PAIRS:
                    pairs.append([a.target, n.target])
    return pairs


def tool_fuse_modules(model, pairs, errors=None):
    """fuse_modules on all pairs; when that raises, pair by pair, keeping those that work."""
    from torch.ao.quantization import fuse_modules

    try:
        return fuse_modules(model, pairs, inplace=False)
    except Exception:  # noqa: BLE001
        pass
    m = copy.deepcopy(model)
    for p in pairs:
        try:
            fuse_modules(m, [p], inplace=True)
        except Exception as e:  # noqa: BLE001
            if errors is not None:
                errors.append(f"{p[0]}+{p[1]}: {type(e).__name__}")
    return m


# --------------------------------------------------------------------------- measures


def bn_calls(model, x) -> int:
    """How many BatchNorm modules run in a forward pass."""
    seen = set()
    hs = [m.register_forward_pre_hook(lambda mod, a: seen.add(id(mod)))
          for m in model.modules() if isinstance(m, BN_TYPES)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return len(seen)


def reference(model, x):
    """The unfolded model's output computed in float64: the exact value every tool approximates."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def max_err(model, ref, x) -> float:
    with torch.no_grad():
        return float((model(x).double() - ref).abs().max())


def exact_folds(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer name -> its exactly folded (weight, bias) in float64, for each layer -> BN pair."""
    from normswap.fold import arith, plan

    out = {}
    for d in plan(model):
        if d.pattern not in ("conv_bn", "convtranspose_bn", "linear_bn"):
            continue
        bn, layer = model.get_submodule(d.norm), model.get_submodule(d.into)
        s = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        t = bn.bias.detach().double() - bn.running_mean.double() * s
        if d.pattern == "convtranspose_bn":
            out[d.into] = arith.fold_affine_after_conv_transpose(layer.weight, layer.bias, s, t, layer.groups)
        else:
            out[d.into] = arith.fold_affine_after_conv(layer.weight, layer.bias, s, t)
    return out


def weight_err(original, folded, exact) -> float | None:
    """Max relative error of a tool's folded weights/biases against the exact float64 fold,
    over the layers the tool folded (a layer whose weight is unchanged was not folded)."""
    errs = []
    for name, (w, b) in exact.items():
        try:
            layer = folded.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(layer, nn.Sequential):  # fuse_modules may wrap
            layer = layer[0]
        if torch.equal(layer.weight, original.get_submodule(name).weight):
            continue
        with torch.no_grad():
            ew = float((layer.weight.double() - w).abs().max() / w.abs().max())
            eb = float((layer.bias.double() - b).abs().max() / b.abs().max())
        errs.append(max(ew, eb))
    return max(errs) if errs else None


def median_time(fn, repeats: int) -> float:
    return median_times({"f": fn}, repeats)["f"]


def median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median time (s) of each function, runs interleaved (noise spreads over all alike)."""
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def without_bn(model: nn.Module) -> nn.Module:
    """The same architecture built without BatchNorm: each BN becomes nn.Identity and every
    conv/linear that fed one gets a bias (as a folded model has)."""
    m = copy.deepcopy(model)
    prev = None
    for name, mod in list(m.named_modules()):
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)):
            prev = mod
        if isinstance(mod, BN_TYPES):
            parent, _, leaf = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, leaf, nn.Identity())
            if prev is not None and prev.bias is None:
                out = prev.weight.shape[1] if isinstance(prev, nn.ConvTranspose2d) else prev.weight.shape[0]
                prev.bias = nn.Parameter(torch.zeros(out))
    return m.eval()


def latency(models: dict[str, nn.Module], x, blocks: int, block_s: float = 0.03) -> dict[str, float]:
    """Median forward time (ms) of each model: interleaved blocks of runs (each block ~block_s
    seconds, its mean per run), so that machine noise spreads over all models alike."""
    with torch.inference_mode():
        for m in models.values():
            for _ in range(3):
                m(x)
        t = time.perf_counter()
        first = next(iter(models.values()))
        first(x)
        per_block = max(1, int(block_s / max(time.perf_counter() - t, 1e-6)))
        times = {k: [] for k in models}
        for _ in range(blocks):
            for k, m in models.items():
                t = time.perf_counter()
                for _ in range(per_block):
                    m(x)
                times[k].append((time.perf_counter() - t) / per_block)
    return {k: (statistics.median(v) * 1e3, min(v) * 1e3) for k, v in times.items()}


def chain(n: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(n):
        layers += [nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
    return randomize_norm_stats(nn.Sequential(*layers)).eval()


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quick = args.quick
    rep = 3 if quick else 11

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s); medians; shared machine, expect ~5-10% timing noise\n")

    # ---------------------------------------------------------------- 1. per model
    r50, r50_in = resnet50_like(width=8 if quick else 16, spatial=32 if quick else 64)
    models = {
        "resnet50_like": (r50.eval(), r50_in[0]),
        "mobilenet_style": tuple(v if i else v.eval() for i, v in enumerate(ALL_SAMPLES["mobilenet_style"]())),
        "convtranspose_decoder": tuple(v if i else v.eval() for i, v in enumerate(ALL_SAMPLES["convtranspose_decoder"]())),
    }
    print("## Sites folded, max output error, time to fold\n")
    print("output error: max |y - y64| of each float32 model over 8 random inputs, y64 = the unfolded model "
          "in float64; weight error: max relative error of the folded weights/biases against the exact "
          "float64 fold (float32 rounding alone is <= 6e-8).\n")
    print("| model | BN layers | tool | sites folded | output error | weight error | fold time (ms) | time / FX fuse |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (model, x) in models.items():
        if isinstance(x, tuple):
            x = x[0]
        n_bn = bn_calls(model, x)
        fold(model)  # warm up imports / caches of all tools
        tool_fx(model)
        pairs = fuse_modules_pairs(model)
        tools = {
            "normswap.fold": lambda m=model: tool_normswap(m),
            "fx.optimization.fuse": lambda m=model: tool_fx(m),
        }
        errors: list[str] = []
        if pairs:
            tools["ao.fuse_modules"] = lambda m=model, p=pairs: tool_fuse_modules(m, p, errors)
        # small models fold in a few ms: more repeats against machine noise
        times = median_times(tools, rep if n_bn > 10 else 4 * rep)
        t_fx = times["fx.optimization.fuse"]
        xe = torch.randn((8,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(1))
        ref = reference(model, xe)
        exact = exact_folds(model)
        print(f"| {name} | {n_bn} | (unfolded, float32) | - | {max_err(model, ref, xe):.2e} | - | - | - |")
        for tname, fn in tools.items():
            errors.clear()
            out = fn()
            folded = n_bn - bn_calls(out, x)
            err = max_err(out, ref, xe)
            werr = weight_err(model, out, exact)
            wtxt = "-" if werr is None else f"{werr:.1e}"
            note = f" (raised on {len(errors)}: {'; '.join(errors)})" if errors else ""
            t = times[tname]
            print(f"| {name} | {n_bn} | {tname} | {folded}{note} | {err:.2e} | {wtxt} | {t * 1e3:.1f} | "
                  f"{t / t_fx:.2f}x |")
    print()

    # ---------------------------------------------------------------- 1b. with example inputs
    print("## Fold with example inputs (input ranks + output check) vs FX fuse + two forward passes\n")
    print("normswap runs the original once (reference outputs and input ranks in the same pass) and the "
          "folded model once; the anchor is FX fuse plus the time of two forward passes of the model.\n")
    tv, _ = resnet50_like(width=16 if quick else 64, num_classes=1000)  # torchvision widths: 64..2048
    tv = tv.eval()
    xin = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    fold(tv, (xin,))
    tool_fx(tv)

    def forward():
        with torch.no_grad():
            tv(xin)

    tt = median_times({"ns": lambda: fold(tv, (xin,)), "ns0": lambda: tool_normswap(tv), "fx": lambda: tool_fx(tv),
                       "fwd": forward}, 5 if quick else 9)
    anchor = tt["fx"] + 2 * tt["fwd"]
    print("| model | input | normswap.fold with inputs (ms) | without inputs (ms) | FX fuse (ms) | one forward (ms) "
          "| with inputs / (FX fuse + 2 forwards) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| ResNet-50 (torchvision widths{', /4' if quick else ''}) | {tuple(xin.shape)} | {tt['ns'] * 1e3:.0f} | "
          f"{tt['ns0'] * 1e3:.0f} | {tt['fx'] * 1e3:.0f} | {tt['fwd'] * 1e3:.0f} | {tt['ns'] / anchor:.2f}x |")
    print()

    # ---------------------------------------------------------------- 2. scaling
    print("## Time to fold a deep conv-BN-ReLU chain\n")
    print("| norm layers | normswap.fold (ms) | per layer (ms) | fx.optimization.fuse (ms) | per layer (ms) | ratio |")
    print("|---|---|---|---|---|---|")
    sizes = (50, 100, 200) if quick else (50, 100, 200, 500, 1000)
    for n in sizes:
        m = chain(n)
        fold(m)
        r = 5 if n >= 500 else rep
        tt = median_times({"ns": lambda: tool_normswap(m), "fx": lambda: tool_fx(m)}, r)
        t_ns, t_fx = tt["ns"], tt["fx"]
        print(f"| {n} | {t_ns * 1e3:.0f} | {t_ns * 1e3 / n:.2f} | {t_fx * 1e3:.0f} | {t_fx * 1e3 / n:.2f} | "
              f"{t_ns / t_fx:.2f}x |")
    print()

    # ---------------------------------------------------------------- 3. latency
    print(f"## CPU inference latency ({args.threads} thread(s), ms: median of interleaved blocks, min in brackets)\n")
    print("| model | input | unfolded | normswap folded | fx fused | no BatchNorm (limit) | folded / limit (median) | folded / limit (min) |")
    print("|---|---|---|---|---|---|---|---|")
    lat_models = {"resnet50_like": models["resnet50_like"], "mobilenet_style": models["mobilenet_style"]}
    for name, (model, x) in lat_models.items():
        if isinstance(x, tuple):
            x = x[0]
        variants = {"unfolded": model, "folded": tool_normswap(model), "fx": tool_fx(model),
                    "nobn": without_bn(model)}
        lat = latency(variants, x, 10 if quick else 60)
        cell = {k: f"{v[0]:.3f} ({v[1]:.3f})" for k, v in lat.items()}
        print(f"| {name} | {tuple(x.shape)} | {cell['unfolded']} | {cell['folded']} | {cell['fx']} | "
              f"{cell['nobn']} | {lat['folded'][0] / lat['nobn'][0]:.3f} | {lat['folded'][1] / lat['nobn'][1]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
