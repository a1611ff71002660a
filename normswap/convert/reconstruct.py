"""Block reconstruction of converted norm layers (``normswap.convert(..., mode="reconstruct")``).

After the closed-form fit of :func:`normswap.convert`, the replacement norms' parameters are
optimised *block by block* (BRECQ / AdaRound style, as in post-training quantization): for each
block (a residual block, or any module holding a few replacement norms), in execution order,

* the block's input is the **converted** model's own activation there (so each block learns to
  correct the error its predecessors left),
* the target is the **original** model's output of the same block on its own (original) input,
* only the replacement norms' parameters inside the block are trained (Adam, cosine decay),
  on an MSE loss normalised by the target's mean square.

Memory is bounded by one block boundary: the converted and the original activations at the input
of the current block, for the calibration set (optionally stored in float16).  When block ``b+1``
consumes block ``b``'s output directly (a chain, e.g. the blocks of a ``Sequential`` stage), the next
inputs are obtained by running block ``b`` alone; otherwise both models are run from the model input
up to block ``b+1`` and stopped there.

Optionally a short end-to-end distillation of the replacement norms follows (KL on the logits of
classifiers, relative MSE otherwise), with horizontal flips and mixup of the calibration inputs.

    converted, rep = normswap.convert(model, "gn", calib, mode="fast")
    info = reconstruct(model, converted, calib)          # trains `converted` in place

Only torch is needed.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["reconstruct", "find_replaced_norms", "find_blocks"]


class _Stop(Exception):
    pass


# ----------------------------------------------------------------------------- structure

def find_replaced_norms(original: nn.Module, converted: nn.Module) -> list[str]:
    """Names of the leaf modules of ``converted`` with parameters whose type differs from the
    module of the same name in ``original`` (the replacements made by ``convert``)."""
    orig = dict(original.named_modules())
    out = []
    for name, m in converted.named_modules():
        if not name or name not in orig:
            continue
        if type(orig[name]) is type(m) or any(True for _ in m.children()):
            continue
        if any(p.is_floating_point() for p in m.parameters(recurse=False)):
            out.append(name)
    return out


def find_blocks(converted: nn.Module, norms: list[str], max_norms: int = 4) -> list[str]:
    """Smallest callable modules holding at most ``max_norms`` replacement norms: descend from the
    root into any module holding more (and into ModuleList/ModuleDict containers).  A norm that is a
    direct child of a module that is split is its own block.  Returned in module order."""
    norms_set = set(norms)
    blocks: list[str] = []

    def count(prefix: str) -> int:
        return sum(1 for n in norms if n == prefix or n.startswith(prefix + "."))

    def visit(name: str, mod: nn.Module) -> None:
        c = count(name) if name else len(norms)
        if c == 0:
            return
        container = isinstance(mod, (nn.ModuleList, nn.ModuleDict))
        if name and (name in norms_set or (c <= max_norms and not container)):
            blocks.append(name)
            return
        for child_name, child in mod.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", converted)
    return blocks


# ----------------------------------------------------------------------------- helpers

def _first_tensor(out):
    """The output agreement / KL are measured on (the same choice as fidelity and distillation)."""
    from .fidelity import first_tensor

    return first_tensor(out)


def _batches(n: int, bs: int):
    for i in range(0, n, bs):
        yield slice(i, min(n, i + bs))


@torch.no_grad()
def _capture_input(model: nn.Module, module: nn.Module, calib: Tensor, bs: int, dtype) -> Tensor:
    """The input of ``module`` for every calibration sample (the forward is stopped there)."""
    chunks: list[Tensor] = []

    def hook(_m, args):
        chunks.append(args[0].detach().to(dtype))
        raise _Stop

    h = module.register_forward_pre_hook(hook)
    try:
        for sl in _batches(calib.shape[0], bs):
            try:
                model(calib[sl])
            except _Stop:
                pass
    finally:
        h.remove()
    if len(chunks) != len(range(0, calib.shape[0], bs)):
        raise RuntimeError("block was not called exactly once per forward")
    return torch.cat(chunks)


@torch.no_grad()
def _run_block(block: nn.Module, inputs: Tensor, bs: int, dtype) -> Tensor:
    return torch.cat([block(inputs[sl].float()).detach().to(dtype) for sl in _batches(inputs.shape[0], bs)])


@torch.no_grad()
def _probe_chain(model: nn.Module, names: list[str], x: Tensor) -> list[bool]:
    """chain[i]: block i+1's input is exactly block i's output (same tensor), block called once
    with a single tensor and returning a tensor."""
    mods = dict(model.named_modules())
    ins: dict[str, list] = {n: [] for n in names}
    outs: dict[str, list] = {n: [] for n in names}
    hs = []
    for n in names:
        hs.append(mods[n].register_forward_pre_hook(lambda m, a, n=n: ins[n].append(a)))
        hs.append(mods[n].register_forward_hook(lambda m, a, o, n=n: outs[n].append(o)))
    try:
        model(x)
    finally:
        for h in hs:
            h.remove()
    for n in names:
        if len(ins[n]) != 1 or len(ins[n][0]) != 1 or not isinstance(ins[n][0][0], Tensor) \
                or not isinstance(outs[n][0], Tensor):
            raise ValueError(f"block {n} is not called once with one tensor (calls: {len(ins[n])}); "
                             "pass blocks=[...] explicitly")
    return [ins[b][0][0] is outs[a][0] for a, b in zip(names[:-1], names[1:])]


class _Adam:
    """Adam with cosine decay (plain loops: avoids importing torch.optim / dynamo)."""

    def __init__(self, params, lr: float, total: int, b1=0.9, b2=0.999, eps=1e-8):
        self.params, self.lr, self.total = list(params), lr, max(1, int(total))
        self.b1, self.b2, self.eps, self.t = b1, b2, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        lr = self.lr * 0.5 * (1 + math.cos(math.pi * min(self.t, self.total) / self.total))
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.mul_(self.b1).add_(p.grad, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(p.grad, p.grad, value=1 - self.b2)
            p.addcdiv_(m / c1, (v / c2).sqrt_().add_(self.eps), value=-lr)
            p.grad = None


def _rel_mse(out: Tensor, ref: Tensor) -> Tensor:
    return ((out - ref) ** 2).mean() / (ref ** 2).mean().clamp_min(1e-12)


# ----------------------------------------------------------------------------- main

def _augment_pair(xc: Tensor, xo: Tensor, g: torch.Generator, mix: float = 0.5) -> tuple[Tensor, Tensor]:
    """The same random horizontal flip and mixup (with another sample of the batch, weight >= 0.5 on
    the sample itself) applied to a batch of converted-model and original-model block inputs."""
    if xc.dim() >= 3:
        flip = (torch.rand(xc.shape[0], generator=g) < 0.5).view(-1, *([1] * (xc.dim() - 1))).to(xc.device)
        xc, xo = torch.where(flip, xc.flip(-1), xc), torch.where(flip, xo.flip(-1), xo)
    if mix > 0 and xc.shape[0] > 1:
        use = (torch.rand(xc.shape[0], generator=g) < mix).to(xc)
        lam = 1 - use * 0.5 * torch.rand(xc.shape[0], generator=g).to(xc)
        lam = lam.view(-1, *([1] * (xc.dim() - 1)))
        xc, xo = lam * xc + (1 - lam) * xc.roll(1, 0), lam * xo + (1 - lam) * xo.roll(1, 0)
    return xc, xo


@torch.no_grad()
def _block_loss(block: nn.Module, x: Tensor, target: Tensor, bs: int = 64) -> float:
    if x.shape[0] == 0:
        return float("nan")
    num = sum(float(((block(x[sl].float()) - target[sl].float()) ** 2).sum()) for sl in _batches(x.shape[0], bs))
    return num / (float((target.float() ** 2).sum()) or 1.0)


def reconstruct(original: nn.Module, converted: nn.Module, calib: Tensor, *,
                blocks: list[str] | None = None, norms: list[str] | None = None, max_norms: int = 4,
                steps_per_block: int = 60, lr: float = 5e-3, batch_size: int = 32, held: int = 0,
                augment: bool = True, train_bias: bool = False, eval_every: int | None = None,
                patience: int = 2, distill_steps: int = 0, distill_lr: float = 1e-3,
                distill_batch_size: int = 32, time_budget_s: float | None = None, store_dtype=torch.float32,
                seed: int = 0, progress: Callable | None = None) -> dict:
    """Optimise the replacement norms of ``converted`` (in place) block by block so that every
    block's output on the converted model's own inputs matches the original block's output.

    original, converted: the model before and after ``normswap.convert`` (same module names).
    calib: calibration inputs (N, ...), a tensor on the models' device.
    held: the last ``held`` samples of ``calib`` are not trained on: they choose, per block, the best
        parameters seen (evaluated every ``eval_every`` steps; training stops after ``patience``
        evaluations without improvement) and a block that got worse on them is reverted.  Without
        them (``held=0``) the training loss decides, which overfits a few photographs.
    blocks: module names to reconstruct, in execution order; default :func:`find_blocks`.
    norms: names of the trainable replacement modules; default :func:`find_replaced_norms`.
    steps_per_block, lr, batch_size: Adam steps (cosine decay) per block on batches of the calib set.
    augment: same random flip + mixup of the converted and the original block inputs (the target is
        the original block on the augmented original input: one extra block forward per step).
    train_bias: also train the ``bias`` of the block's other modules (convs, linears), not weights.
    distill_steps: then end-to-end distillation steps of the replacement norms (KL on the logits,
        with flips, random re-crops and mixup when ``augment``); kept only if it lowers the KL on
        the held-back samples.
    time_budget_s: wall-clock budget; block steps are cut to fit (the distillation gets its share
        proportionally to its steps, counted as 6 block steps each).
    store_dtype: dtype of the stored boundary activations (torch.float16 halves the memory).
    progress: ``progress(block_name, step, loss)``; block_name is "distill" for distillation.

    Memory: the converted and the original activations at one block boundary for the calibration
    set, plus the block's target output (never the whole model's activations).

    Returns a dict: ``blocks`` (per block: name, norms, loss_before, loss_after (on the held-back
    samples when ``held``), steps, seconds, chained, reverted), ``seconds``, ``distill_loss``.
    """
    t_start = time.perf_counter()
    original.eval()
    converted.eval()
    calib = calib.detach()
    n = calib.shape[0]
    held = int(held) if 0 < int(held) < n else 0
    ntr = n - held
    norms = list(norms) if norms is not None else find_replaced_norms(original, converted)
    if not norms:
        raise ValueError("no replacement norm layers found (names differing in type from the original)")
    blocks = list(blocks) if blocks is not None else find_blocks(converted, norms, max_norms)
    cmods, omods = dict(converted.named_modules()), dict(original.named_modules())
    for b in blocks:
        if b not in cmods or b not in omods:
            raise ValueError(f"block {b!r} is not a module of both models")

    # freeze everything but the replacement norms
    req = {p: p.requires_grad for p in converted.parameters()}
    for p in converted.parameters():
        p.requires_grad_(False)
    norm_params = {nm: [p for p in cmods[nm].parameters() if p.is_floating_point()] for nm in norms}

    chain = _probe_chain(converted, blocks, calib[:2])
    g = torch.Generator().manual_seed(seed)
    deadline = None if time_budget_s is None else t_start + float(time_budget_s)
    result = {"blocks": [], "norms": norms, "held": held}
    x_conv = x_orig = None
    try:
        for bi, name in enumerate(blocks):
            tb = time.perf_counter()
            cblk, oblk = cmods[name], omods[name]
            if x_conv is None:
                x_conv = _capture_input(converted, cblk, calib, 64, store_dtype)
                x_orig = _capture_input(original, oblk, calib, 64, store_dtype)
            target = _run_block(oblk, x_orig, 64, store_dtype)
            inside = [nm for nm in norms if nm == name or nm.startswith(name + ".")]
            params = [p for nm in inside for p in norm_params[nm]]
            if train_bias:
                own = {id(p) for p in params}
                for mn, m in cblk.named_modules():
                    full = f"{name}.{mn}" if mn else name
                    b = getattr(m, "bias", None)
                    if full not in inside and isinstance(b, nn.Parameter) and id(b) not in own:
                        params.append(b)
                        own.add(id(b))
            entry = {"name": name, "norms": len(inside), "chained": bool(bi < len(chain) and chain[bi]),
                     "reverted": False}
            xv, tv = (x_conv[ntr:], target[ntr:]) if held else (x_conv, target)
            before = _block_loss(cblk, xv, tv)
            entry["loss_before"] = before
            limit = steps_per_block
            timed = deadline is not None
            if timed:
                left = deadline - time.perf_counter()
                units_left = (len(blocks) - bi) * steps_per_block + 6 * distill_steps
                share = left * steps_per_block / max(units_left, 1)
            init = [p.detach().clone() for p in params]
            best, best_loss = [q.clone() for q in init], before
            every = int(eval_every) if eval_every else max(5, steps_per_block // 6)
            k = 0
            if params and limit > 0 and (not timed or share > 0):
                for p in params:
                    p.requires_grad_(True)
                opt = _Adam(params, lr, limit)
                t0, bad = time.perf_counter(), 0
                while k < limit:
                    idx = torch.randint(0, ntr, (min(batch_size, ntr),), generator=g)
                    xc = x_conv[idx].float()
                    if augment:
                        xc, xo = _augment_pair(xc, x_orig[idx].float(), g)
                        with torch.no_grad():
                            tgt = oblk(xo)
                    else:
                        tgt = target[idx].float()
                    loss = _rel_mse(cblk(xc), tgt)
                    loss.backward()
                    opt.step()
                    k += 1
                    if progress is not None:
                        progress(name, k, float(loss.detach()))
                    if timed and k == 3:  # fit the remaining steps into this block's share
                        per = (time.perf_counter() - t0) / 3
                        limit = max(3, min(steps_per_block, int(share / max(per, 1e-9))))
                        opt.total = limit
                    if k % every == 0 or k == limit:
                        cur = _block_loss(cblk, xv, tv)
                        if cur < best_loss:
                            best_loss, bad = cur, 0
                            best = [p.detach().clone() for p in params]
                        else:
                            bad += 1
                            if held and bad >= patience:
                                break
                for p in params:
                    p.requires_grad_(False)
                    p.grad = None
            entry["steps"] = k
            # keep the best parameters seen (on the held-back samples when there are some); a block
            # that did not improve is reverted to its closed-form fit
            with torch.no_grad():
                for p, q in zip(params, best if best_loss < before else init):
                    p.copy_(q)
            entry["reverted"] = not best_loss < before
            entry["loss_after"] = min(best_loss, before)
            if bi + 1 < len(blocks) and chain[bi]:
                x_conv, x_orig = _run_block(cblk, x_conv, 64, store_dtype), target
            else:
                x_conv = x_orig = None
            del target
            entry["seconds"] = time.perf_counter() - tb
            result["blocks"].append(entry)
        x_conv = x_orig = None

        if distill_steps > 0:
            result["distill_loss"] = _distill(original, converted, calib, [p for ps in norm_params.values() for p in ps],
                                              distill_steps, distill_lr, distill_batch_size, augment, g,
                                              deadline, progress, held=held)
    finally:
        for p, r in req.items():
            p.requires_grad_(r)
    result["seconds"] = time.perf_counter() - t_start
    return result


def _random_recrop(x: Tensor, g: torch.Generator, min_share: float = 0.6) -> Tensor:
    """One random-resized re-crop (area share >= ``min_share``) of a batch of images, resized back."""
    if x.dim() != 4:
        return x
    H, W = x.shape[-2:]
    s = math.sqrt(min_share + (1 - min_share) * float(torch.rand(1, generator=g)))
    h, w = max(1, int(H * s)), max(1, int(W * s))
    top = int(torch.randint(0, H - h + 1, (1,), generator=g))
    left = int(torch.randint(0, W - w + 1, (1,), generator=g))
    return F.interpolate(x[..., top:top + h, left:left + w], size=(H, W), mode="bilinear", align_corners=False)


@torch.no_grad()
def _kl_on(original, converted, x: Tensor) -> float:
    tot = 0.0
    for sl in _batches(x.shape[0], 64):
        ref = _first_tensor(original(x[sl])).double()
        out = _first_tensor(converted(x[sl])).double()
        if ref.dim() == 2 and ref.shape[1] > 1:
            lp, lq = F.log_softmax(ref, 1), F.log_softmax(out, 1)
            tot += float((lp.exp() * (lp - lq)).sum())
        else:
            tot += float(((out - ref) ** 2).sum() / (ref ** 2).sum().clamp_min(1e-30)) * ref.shape[0]
    return tot / max(1, x.shape[0])


def _distill(original, converted, calib, params, steps, lr, bs, augment, g, deadline, progress, held=0):
    n_all = calib.shape[0]
    val = calib[n_all - held:] if held else None
    kl0 = _kl_on(original, converted, val) if held else None
    init = [p.detach().clone() for p in params]
    calib = calib[:n_all - held] if held else calib
    with torch.no_grad():
        ref_all = torch.cat([_first_tensor(original(calib[sl])).float() for sl in _batches(calib.shape[0], 64)])
    classifier = ref_all.dim() == 2 and ref_all.shape[1] > 1
    for p in params:
        p.requires_grad_(True)
    opt = _Adam(params, lr, steps)
    n = calib.shape[0]
    loss_v = float("nan")
    try:
        for k in range(steps):
            if deadline is not None and time.perf_counter() > deadline:
                break
            idx = torch.randint(0, n, (min(bs, n),), generator=g)
            x = calib[idx]
            if augment:
                flip = torch.rand(x.shape[0], generator=g) < 0.5
                if x.dim() == 4:
                    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
                    if bool(torch.rand(1, generator=g) < 0.5):
                        x = _random_recrop(x, g)
                lam = (0.5 + 0.5 * torch.rand(x.shape[0], generator=g)).view(-1, *([1] * (x.dim() - 1))).to(x)
                x = lam * x + (1 - lam) * x.roll(1, 0)
                with torch.no_grad():
                    ref = _first_tensor(original(x)).float()
            else:
                ref = ref_all[idx]
            out = _first_tensor(converted(x)).float()
            if classifier:
                loss = F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean")
            else:
                loss = _rel_mse(out, ref)
            loss.backward()
            opt.step()
            loss_v = float(loss.detach())
            if progress is not None:
                progress("distill", k + 1, loss_v)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    if held and not _kl_on(original, converted, val) < kl0:  # did not help on the held-back samples
        with torch.no_grad():
            for p, q in zip(params, init):
                p.copy_(q)
    return loss_v
