"""Small sample models: one per norm kind and per hard case.

Every factory returns ``(model, example_inputs)``: the model in eval mode (except
``train_mode``) with random, non-trivial running statistics and affine parameters, and a
tuple of forward arguments.  All are tiny (CPU, fast).  ``ALL_SAMPLES`` maps a name to
each factory; ``resnet50_like`` builds a ResNet-50-shaped model (53 BatchNorms) for
benchmarks and speed tests.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ALL_SAMPLES", "randomize_norm_stats", "resnet50_like"]


# --------------------------------------------------------------------------- helpers


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm random non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, m in model.named_modules():
            for bname in ("running_mean",):
                t = getattr(m, bname, None)
                if isinstance(t, Tensor) and t.is_floating_point() and t.numel():
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            for bname in ("running_var", "running_phi"):
                t = getattr(m, bname, None)
                if isinstance(t, Tensor) and t.is_floating_point() and t.numel():
                    t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            nbt = getattr(m, "num_batches_tracked", None)
            if isinstance(nbt, Tensor):
                nbt.fill_(100)
            if _is_norm_like(m):
                w = getattr(m, "weight", None)
                b = getattr(m, "bias", None)
                if isinstance(w, Tensor) and w.is_floating_point() and w.dim() >= 1:
                    w.copy_(torch.rand(w.shape, generator=g) * 0.8 + 0.6)
                if isinstance(b, Tensor) and b.is_floating_point() and b.dim() >= 1:
                    b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def _is_norm_like(m: nn.Module) -> bool:
    name = type(m).__name__
    return "Norm" in name and not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))


def _finish(model: nn.Module, inputs: tuple, seed: int = 0, train: bool = False):
    torch.manual_seed(seed)
    randomize_norm_stats(model, seed)
    model.train(train)
    return model, inputs


def _x(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- ResNet style


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + idt)


class ResNetLike(nn.Module):
    def __init__(self, num_blocks=(1, 1), width: int = 4, in_ch: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width * 2, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * 2)
        self.relu = nn.ReLU(inplace=True)
        layers = []
        cin = width * 2
        for i, n in enumerate(num_blocks):
            w = width * (2 ** i)
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, w, stride=2 if (j == 0 and i > 0) else 1))
                cin = w * Bottleneck.expansion
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_style():
    """conv-BN-ReLU stem and two bottleneck blocks with residuals (one with a downsample)."""
    return _finish(ResNetLike((1, 1), width=4), (_x(2, 3, 16, 16),))


def resnet50_like(num_blocks=(3, 4, 6, 3), width: int = 8, in_ch: int = 3, num_classes: int = 10,
                  spatial: int = 32):
    """ResNet-50-shaped model (53 BatchNorm2d with the default blocks), built in code."""
    return _finish(ResNetLike(tuple(num_blocks), width=width, in_ch=in_ch, num_classes=num_classes),
                   (_x(1, in_ch, spatial, spatial),))


# --------------------------------------------------------------------------- MobileNet / pre-activation / decoder


class MobileNetLike(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = conv_bn(3, c, 3)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.dw_bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU6()
        self.pw = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(2 * c)
        self.head = nn.Linear(2 * c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.act(self.dw_bn(self.dw(x)))
        x = self.act(self.pw_bn(self.pw(x)))
        return self.head(x.mean((2, 3)))


def mobilenet_style():
    """Depthwise (groups=C) and pointwise convs, each followed by BN."""
    return _finish(MobileNetLike(), (_x(2, 3, 16, 16),))


class PreActBlock(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + x


class PreActNet(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.block = PreActBlock(c)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = self.block(self.conv(x))
        return self.fc(F.relu(self.bn(x)).mean((2, 3)))


def preact():
    """Pre-activation BN-ReLU-conv; block.bn1 is fed by the residual stream (conv output with
    two users), block.bn2 by conv1 (single user), bn by the residual add."""
    return _finish(PreActNet(), (_x(2, 3, 12, 12),))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(6)
        self.out = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, z):
        x = F.relu(self.bn1(self.up1(z)))
        x = F.relu(self.bn2(self.up2(x)))
        return torch.tanh(self.out(x))


def convtranspose_decoder():
    """ConvTranspose2d + BN, the second with groups=2 (weight layout (in, out/groups, k, k))."""
    return _finish(Decoder(), (_x(2, 8, 4, 4),))


# --------------------------------------------------------------------------- MLPs with BatchNorm1d


class MLPBN(nn.Module):
    def __init__(self, d_in: int = 12, hidden: int = 16, d_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x):
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.fc3(x)


def mlp_bn1d():
    """Linear + BatchNorm1d on 2-D (N, C) input: BN normalises the Linear's features."""
    return _finish(MLPBN(), (_x(4, 12),))


class SeqBN(nn.Module):
    """Linear on (N, L, C) then BatchNorm1d(L) on the (N, L, C) output, with L == C == 8:
    BN normalises dim 1 (the sequence axis), not the Linear's output features."""

    def __init__(self, length: int = 8, d: int = 8):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(length)
        self.fc = nn.Linear(d, 2)

    def forward(self, x):  # x: (N, L, C)
        return self.fc(F.relu(self.bn(self.proj(x))))


def mlp_bn1d_3d():
    return _finish(SeqBN(), (_x(4, 8, 8),))


# --------------------------------------------------------------------------- transformers


class LlamaRMSNorm(nn.Module):
    """Rebuild of HF transformers' LlamaRMSNorm (variance in fp32, eps attr variance_epsilon)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class TransformerBlock(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2, norm1=None, norm2=None):
        super().__init__()
        self.norm1 = norm1 if norm1 is not None else nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = norm2 if norm2 is not None else nn.RMSNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 16, llama: bool = False):
        super().__init__()
        self.embed = nn.Linear(8, d)
        if llama:
            self.block = TransformerBlock(d, norm1=LlamaRMSNorm(d), norm2=LlamaRMSNorm(d))
            self.norm = LlamaRMSNorm(d)
        else:
            self.block = TransformerBlock(d)
            self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        return self.head(self.norm(self.block(self.embed(x))))


def transformer():
    """Pre-norm transformer block with nn.LayerNorm (norm1, final norm) and nn.RMSNorm (norm2)."""
    return _finish(TinyTransformer(), (_x(2, 5, 8),))


def llama_block():
    """Transformer block whose norms are HF-style LlamaRMSNorm classes (kind custom)."""
    return _finish(TinyTransformer(llama=True), (_x(2, 5, 8),))


# --------------------------------------------------------------------------- U-Net with GN / IN


class UNetLike(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(4, c), nn.SiLU())
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.gn_mid = nn.GroupNorm(2, 2 * c)
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.in_up = nn.InstanceNorm2d(c, affine=True)
        self.in_tracked = nn.InstanceNorm2d(c, track_running_stats=True)
        self.dec = nn.Conv2d(2 * c, c, 3, padding=1)
        self.out = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        e = self.enc1(x)
        m = F.silu(self.gn_mid(self.down(e)))
        u = F.relu(self.in_up(self.up(m)))
        d = self.dec(torch.cat([u, e], 1))
        return self.out(F.relu(self.in_tracked(d)))


def unet():
    """U-Net with GroupNorm and InstanceNorm (one affine, one with running statistics)."""
    return _finish(UNetLike(), (_x(2, 3, 16, 16),))


# --------------------------------------------------------------------------- weight reparametrisations


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.utils.spectral_norm(nn.Conv2d(3, 8, 3, stride=2, padding=1))  # legacy hook API
        self.conv2 = nn.utils.parametrizations.spectral_norm(nn.Conv2d(8, 16, 3, stride=2, padding=1))
        self.fc = nn.utils.parametrizations.spectral_norm(nn.Linear(16, 1))

    def forward(self, x):
        x = F.leaky_relu(self.conv1(x), 0.2)
        x = F.leaky_relu(self.conv2(x), 0.2)
        return self.fc(x.mean((2, 3)))


def gan_discriminator():
    """Spectral norm in both APIs: conv1 (hook: weight_orig/u/v), conv2 and fc (parametrizations)."""
    return _finish(Discriminator(), (_x(2, 3, 16, 16),))


class WeightNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.conv = nn.utils.weight_norm(nn.Conv2d(3, 6, 3, padding=1))  # legacy hook API
        self.fc = nn.utils.parametrizations.weight_norm(nn.Linear(6, 3))

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def weight_norm_net():
    """Weight norm in both APIs: conv (hook: weight_g/weight_v), fc (parametrizations)."""
    return _finish(WeightNormNet(), (_x(2, 3, 8, 8),))


# --------------------------------------------------------------------------- seed layers


def _layers():
    import normswap.layers as L

    return L


class CondGenerator(nn.Module):
    def __init__(self, num_classes: int = 5, c: int = 8):
        super().__init__()
        L = _layers()
        self.fc = nn.Linear(16, c * 4 * 4)
        self.up = nn.ConvTranspose2d(c, c, 4, stride=2, padding=1)
        self.cbn1 = L.ConditionalBatchNorm2d(c, num_classes=num_classes)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.cbn2 = L.ConditionalBatchNorm2d(c, cond_dim=6)
        self.out = nn.Conv2d(c, 3, 3, padding=1)
        self.cond = nn.Embedding(num_classes, 6)
        self.c = c

    def forward(self, z, y):
        x = self.fc(z).view(z.shape[0], self.c, 4, 4)
        x = F.relu(self.cbn1(self.up(x), y))
        x = F.relu(self.cbn2(self.conv(x), self.cond(y)))
        return torch.tanh(self.out(x))


def _perturb_embeddings(model: nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ in ("ConditionalBatchNorm2d", "SandwichBatchNorm2d"):
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def cond_generator():
    """Conditional generator with ConditionalBatchNorm2d (class-conditional and vector-conditional);
    forward(z, y) with y int labels."""
    m, inputs = _finish(CondGenerator(), (_x(2, 16), torch.tensor([1, 3])))
    return _perturb_embeddings(m), inputs


class SeedNet(nn.Module):
    """conv -> norm -> act -> conv -> norm -> pooled linear head."""

    def __init__(self, make_norm, c: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.norm1 = make_norm(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.norm2 = make_norm(c)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def frn_net():
    """Two FilterResponseNorm2d (+TLU) layers after convs."""
    L = _layers()
    m, inputs = _finish(SeedNet(lambda c: L.FilterResponseNorm2d(c)), (_x(2, 3, 8, 8),))
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "tau") and isinstance(mod.tau, Tensor):
                mod.tau.copy_(torch.randn(mod.tau.shape) * 0.1)
    return m, inputs


def powernorm_net():
    """Two PowerNorm2d layers (running quadratic mean) after convs."""
    L = _layers()
    return _finish(SeedNet(lambda c: L.PowerNorm2d(c)), (_x(2, 3, 8, 8),))


def bgn_net():
    """Two BatchGroupNorm2d(C, 2) layers after convs."""
    L = _layers()
    return _finish(SeedNet(lambda c: L.BatchGroupNorm2d(c, 2)), (_x(2, 3, 8, 8),))


class SaBNNet(nn.Module):
    def __init__(self, c: int = 8, branches: int = 3):
        super().__init__()
        L = _layers()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.sabn1 = L.SandwichBatchNorm2d(c, branches)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.sabn2 = L.SandwichBatchNorm2d(c, branches)
        self.fc = nn.Linear(c, 4)

    def forward(self, x, branch):
        x = F.relu(self.sabn1(self.conv1(x), branch))
        x = F.relu(self.sabn2(self.conv2(x), branch))
        return self.fc(x.mean((2, 3)))


def sabn_net():
    """Sandwich BN with 3 branches; forward(x, branch) with branch an int tensor (N,)."""
    m, inputs = _finish(SaBNNet(), (_x(2, 3, 8, 8), torch.tensor([0, 2])))
    return _perturb_embeddings(m), inputs


# --------------------------------------------------------------------------- functional / LRN


class FunctionalNorms(nn.Module):
    """Norms called as functions on the module's own buffers/parameters."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.register_buffer("rm", torch.zeros(c))
        self.register_buffer("rv", torch.ones(c))
        self.gamma = nn.Parameter(torch.ones(c))
        self.beta = nn.Parameter(torch.zeros(c))
        self.fc = nn.Linear(c, 8)
        self.ln_w = nn.Parameter(torch.ones(8))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        x = self.conv(x)
        x = F.batch_norm(x, self.rm, self.rv, self.gamma, self.beta, training=False, eps=1e-5)
        x = F.group_norm(F.relu(x), 2)
        x = F.instance_norm(x)
        h = self.fc(x.mean((2, 3)))
        h = F.layer_norm(h, (8,), self.ln_w, None, 1e-5)
        h = F.rms_norm(h, (8,), eps=1e-6)
        return self.out(h)


def functional_norms():
    """F.batch_norm (on buffers, eval), F.group_norm, F.instance_norm, F.layer_norm, F.rms_norm."""
    m, inputs = _finish(FunctionalNorms(), (_x(2, 3, 8, 8),))
    with torch.no_grad():
        m.rm.copy_(torch.randn(m.rm.shape) * 0.2)
        m.rv.copy_(torch.rand(m.rv.shape) + 0.5)
    return m, inputs


class AlexLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.lrn = nn.LocalResponseNorm(3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.lrn(F.relu(self.conv(x))).mean((2, 3)))


def lrn_net():
    """LocalResponseNorm after a conv+ReLU."""
    return _finish(AlexLike(), (_x(2, 3, 8, 8),))


# --------------------------------------------------------------------------- hard cases


class DataDependentBlock(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: FX cannot trace this
            return F.relu(self.bn(self.conv(x)))
        return x


class Untraceable(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.block = DataDependentBlock(c)
        self.head_conv = nn.Conv2d(c, c, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 2)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.fc(self.head_bn(self.head_conv(x)).mean((2, 3)))


def untraceable():
    """``block`` has `if x.sum() > 0` in its forward: it is analysed without a graph; the rest
    (stem.1, head_bn) with one."""
    return _finish(Untraceable(), (_x(2, 3, 8, 8),))


class SharedPair(nn.Module):
    """One conv+BN pair called twice."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 2)

    def forward(self, x):
        x = self.conv_in(x)
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def shared_pair():
    return _finish(SharedPair(), (_x(2, 3, 8, 8),))


class SharedProducer(nn.Module):
    """One conv whose output feeds two different BNs."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(c)
        self.bn_b = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc((F.relu(self.bn_a(y)) + torch.sigmoid(self.bn_b(y))).mean((2, 3)))


def shared_producer():
    return _finish(SharedProducer(), (_x(2, 3, 8, 8),))


def train_mode():
    """A ResNet-style model left in training mode."""
    return _finish(ResNetLike((1,), width=4), (_x(2, 3, 8, 8),), train=True)


class SmallCNN(nn.Module):
    def __init__(self, c: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 2)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def nan_stats():
    """bn1.running_var[2] is NaN and bn2.weight[0] is Inf."""
    m, inputs = _finish(SmallCNN(), (_x(2, 3, 8, 8),))
    with torch.no_grad():
        m.bn1.running_var[2] = float("nan")
        m.bn2.weight[0] = float("inf")
    return m, inputs


def tiny_var():
    """bn1.running_var[1] = 1e-14 (as in torchvision InceptionV3), eps 1e-3; bn2 has eps = 0."""
    m, inputs = _finish(SmallCNN(), (_x(2, 3, 8, 8),))
    with torch.no_grad():
        m.bn1.eps = 1e-3
        m.bn1.running_var[1] = 1e-14
    m.bn2.eps = 0.0
    return m, inputs


def untrained_stats():
    """bn1 has fresh statistics (mean 0, var 1, num_batches_tracked 0); bn2 has no running
    statistics (track_running_stats=False)."""
    m = SmallCNN()
    randomize_norm_stats(m)
    m.bn1.reset_running_stats()
    m.bn2 = nn.BatchNorm2d(6, track_running_stats=False)
    return m.eval(), (_x(2, 3, 8, 8),)


# --------------------------------------------------------------------------- other libraries' classes


class BatchNormAct2d(nn.BatchNorm2d):
    """Rebuild of timm's BatchNormAct2d: a BatchNorm2d subclass that also applies an activation."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x):
        x = super().forward(x)
        return self.act(self.drop(x))


class FrozenBatchNorm2d(nn.Module):
    """Rebuild of torchvision.ops.FrozenBatchNorm2d: weight, bias, running_mean, running_var
    are all buffers."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm2d(nn.LayerNorm):
    """Rebuild of torchvision's LayerNorm2d: a LayerNorm subclass normalising the channels of
    an NCHW input (permute to NHWC, LayerNorm, permute back)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def timm_bnact():
    """conv + timm-style BatchNormAct2d (subclass: unsupported_subclass) + plain BN."""
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), BatchNormAct2d(6),
                      nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    return _finish(m, (_x(2, 3, 8, 8),))


def frozen_bn():
    """conv + torchvision-style FrozenBatchNorm2d (buffers only)."""
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), FrozenBatchNorm2d(6), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    m, inputs = _finish(m, (_x(2, 3, 8, 8),))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        fb = m[1]
        fb.weight.copy_(torch.rand(6, generator=g) + 0.5)
        fb.bias.copy_(torch.randn(6, generator=g) * 0.1)
    return m, inputs


def layernorm2d():
    """ConvNeXt-style conv + torchvision-style LayerNorm2d (nn.LayerNorm subclass)."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), LayerNorm2d(8), nn.GELU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    return _finish(m, (_x(2, 3, 8, 8),))


# --------------------------------------------------------------------------- registry


ALL_SAMPLES: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "resnet_style": resnet_style,
    "mobilenet_style": mobilenet_style,
    "preact": preact,
    "convtranspose_decoder": convtranspose_decoder,
    "mlp_bn1d": mlp_bn1d,
    "mlp_bn1d_3d": mlp_bn1d_3d,
    "transformer": transformer,
    "llama_block": llama_block,
    "unet": unet,
    "gan_discriminator": gan_discriminator,
    "weight_norm_net": weight_norm_net,
    "cond_generator": cond_generator,
    "frn_net": frn_net,
    "powernorm_net": powernorm_net,
    "bgn_net": bgn_net,
    "sabn_net": sabn_net,
    "functional_norms": functional_norms,
    "lrn_net": lrn_net,
    "untraceable": untraceable,
    "shared_pair": shared_pair,
    "shared_producer": shared_producer,
    "train_mode": train_mode,
    "nan_stats": nan_stats,
    "tiny_var": tiny_var,
    "untrained_stats": untrained_stats,
    "timm_bnact": timm_bnact,
    "frozen_bn": frozen_bn,
    "layernorm2d": layernorm2d,
}
