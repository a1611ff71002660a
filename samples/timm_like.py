"""Faithful small rebuilds of the norm and conv classes of timm, EfficientNet-PyTorch and
Hugging Face that matter to normswap (same class names, attributes, children and forward),
so the default test suite needs none of those multi-GB installs.  tests/test_real_libraries.py
checks the same verdicts against the real classes where they are installed.
"""

from __future__ import annotations

import copy
import math
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BatchNormAct2d", "GroupNormAct", "LayerNorm2d", "ConvNextLayerNorm", "FilterResponseNormAct2d",
    "FilterResponseNormTlu2d", "EvoNorm2dB0", "EvoNorm2dS0", "StdConv2d", "ScaledStdConv2d",
    "Conv2dSame", "Conv2dStaticSamePadding", "timm_bnact_net", "conv2dsame_net", "frn_act_net",
    "evonorm_net", "stdconv_net", "convnext_block", "DropPath", "DualGraphModule", "create_feature_extractor",
    "FeatureGraphNet", "feature_graph_net",
]


# --------------------------------------------------------------------------- timm norm + act

class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d: BatchNorm2d (own running stats), then drop, then act."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, inplace=True, drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act and act_layer is not None else nn.Identity()

    def forward(self, x):
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        bn_training = True if self.training else (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


class GroupNormAct(nn.GroupNorm):
    """timm GroupNormAct: GroupNorm, then drop, then act."""

    def __init__(self, num_channels, num_groups=32, eps=1e-5, affine=True, apply_act=True,
                 act_layer=nn.ReLU, inplace=True, drop_layer=None):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act and act_layer is not None else nn.Identity()

    def forward(self, x):
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return self.act(self.drop(x))


class LayerNorm2d(nn.LayerNorm):
    """timm / torchvision LayerNorm2d: LayerNorm over the channels of an NCHW tensor."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNextLayerNorm(nn.Module):
    """Hugging Face ConvNextLayerNorm: channels_last (LayerNorm over the last dim) or
    channels_first (over dim 1 of NCHW, computed by hand)."""

    def __init__(self, normalized_shape, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        input_dtype = x.dtype
        x = x.float()
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        x = x.to(dtype=input_dtype)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def _inv_instance_rms(x, eps: float = 1e-5):
    return x.square().float().mean(dim=(2, 3), keepdim=True).add(eps).rsqrt().to(x.dtype)


class FilterResponseNormTlu2d(nn.Module):
    """timm FilterResponseNormTlu2d: FRN with a learned threshold (TLU)."""

    def __init__(self, num_features, apply_act=True, eps=1e-5, rms=True):
        super().__init__()
        self.apply_act = apply_act
        self.rms = rms
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.tau = nn.Parameter(torch.zeros(num_features)) if apply_act else None

    def forward(self, x):
        v_shape = (1, -1, 1, 1)
        x = x * _inv_instance_rms(x, self.eps)
        x = x * self.weight.view(v_shape) + self.bias.view(v_shape)
        return torch.maximum(x, self.tau.reshape(v_shape)) if self.tau is not None else x


class FilterResponseNormAct2d(nn.Module):
    """timm FilterResponseNormAct2d: FRN, then an act child (a module with children: round 1's
    custom-norm recogniser missed it)."""

    def __init__(self, num_features, apply_act=True, act_layer=nn.ReLU, inplace=None, rms=True, eps=1e-5):
        super().__init__()
        self.act = act_layer() if act_layer is not None and apply_act else nn.Identity()
        self.rms = rms
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        v_shape = (1, -1, 1, 1)
        x = x * _inv_instance_rms(x, self.eps)
        x = x * self.weight.view(v_shape) + self.bias.view(v_shape)
        return self.act(x)


class EvoNorm2dB0(nn.Module):
    """timm EvoNorm2dB0: batch variance (running at eval) gated with the instance std."""

    def __init__(self, num_features, apply_act=True, momentum=0.1, eps=1e-3):
        super().__init__()
        self.apply_act = apply_act
        self.momentum = momentum
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features)) if apply_act else None
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        v_shape = (1, -1, 1, 1)
        if self.v is not None:
            if self.training:
                var = x.float().var(dim=(0, 2, 3), unbiased=False)
                n = x.numel() / x.shape[1]
                self.running_var.copy_(self.running_var * (1 - self.momentum)
                                       + var.detach() * self.momentum * (n / (n - 1)))
            else:
                var = self.running_var
            left = var.add(self.eps).sqrt_().to(x.dtype).view(v_shape).expand_as(x)
            v = self.v.to(x.dtype).view(v_shape)
            right = x * v + x.float().var(dim=(2, 3), unbiased=False, keepdim=True).add(self.eps).sqrt().to(x.dtype)
            x = x / left.max(right)
        return x * self.weight.to(x.dtype).view(v_shape) + self.bias.to(x.dtype).view(v_shape)


class EvoNorm2dS0(nn.Module):
    """timm EvoNorm2dS0: x * sigmoid(v * x) / group std (per sample)."""

    def __init__(self, num_features, groups=8, apply_act=True, eps=1e-5):
        super().__init__()
        self.apply_act = apply_act
        self.groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features)) if apply_act else None

    def forward(self, x):
        v_shape = (1, -1, 1, 1)
        if self.v is not None:
            B, C, H, W = x.shape
            xg = x.float().reshape(B, self.groups, -1)
            std = xg.var(dim=-1, unbiased=False, keepdim=True).add(self.eps).sqrt()
            std = std.expand(xg.shape).reshape(B, C, H, W).to(x.dtype)
            x = x * (x * self.v.view(v_shape)).sigmoid() / std
        return x * self.weight.view(v_shape) + self.bias.view(v_shape)


# --------------------------------------------------------------------------- convs with their own forward

def _same_pad(x: int, k: int, s: int, d: int) -> int:
    return max((math.ceil(x / s) - 1) * s + (k - 1) * d + 1 - x, 0)


class Conv2dSame(nn.Conv2d):
    """timm Conv2dSame (all tf_* models): TF 'same' padding computed from the input, then F.conv2d."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        pad_h = _same_pad(ih, kh, self.stride[0], self.dilation[0])
        pad_w = _same_pad(iw, kw, self.stride[1], self.dilation[1])
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class Conv2dStaticSamePadding(nn.Conv2d):
    """EfficientNet-PyTorch's Conv2dStaticSamePadding: a fixed ZeroPad2d for one image size."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, image_size=None, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, **kwargs)
        self.stride = self.stride if len(self.stride) == 2 else [self.stride[0]] * 2
        ih, iw = (image_size, image_size) if isinstance(image_size, int) else image_size
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        pad_h = _same_pad(ih, kh, sh, self.dilation[0])
        pad_w = _same_pad(iw, kw, sw, self.dilation[1])
        if pad_h > 0 or pad_w > 0:
            self.static_padding = nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        else:
            self.static_padding = nn.Identity()

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """timm StdConv2d (BiT): the weight is standardised per output channel in forward."""

    def __init__(self, in_channel, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, eps=1e-6):
        if padding is None:
            padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        super().__init__(in_channel, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              training=True, momentum=0., eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm ScaledStdConv2d (NFNets): standardised weight times a learned gain and 1/sqrt(fan-in)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=True, gamma=1.0, eps=1e-6, gain_init=1.0):
        if padding is None:
            padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain_init))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).reshape(-1), training=True, momentum=0.,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


# --------------------------------------------------------------------------- sample networks

def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for n in ("running_mean", "running_var"):
                t = getattr(m, n, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    t.copy_(torch.randn(t.shape, generator=g) * 0.5 if n == "running_mean"
                            else torch.rand(t.shape, generator=g) + 0.5)
            for n in ("weight", "bias"):
                p = getattr(m, n, None)
                if isinstance(p, nn.Parameter) and p.dim() == 1:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if n == "weight" else 0.0))
    return model.eval()


def _x(*shape: int, seed: int = 0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def timm_bnact_net():
    """conv -> BatchNormAct2d(ReLU) -> depthwise conv -> BatchNormAct2d(SiLU, dropout) -> head."""
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        BatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=lambda: nn.Dropout(0.2)),
        nn.Conv2d(8, 4, 1), BatchNormAct2d(4, apply_act=False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return _randomize(m), (_x(2, 3, 8, 8),)


def conv2dsame_net():
    """tf_* style: Conv2dSame / Conv2dStaticSamePadding convs (own forward) each followed by BN."""
    m = nn.Sequential(
        Conv2dSame(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        Conv2dStaticSamePadding(8, 8, 3, stride=1, image_size=4, groups=8, bias=False), nn.BatchNorm2d(8),
        nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return _randomize(m), (_x(2, 3, 8, 8),)


def frn_act_net():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), FilterResponseNormAct2d(8),
                      nn.Conv2d(8, 8, 3, padding=1), FilterResponseNormTlu2d(8),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return _randomize(m), (_x(2, 3, 8, 8),)


def evonorm_net():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), EvoNorm2dB0(8), nn.Conv2d(8, 8, 3, padding=1),
                      EvoNorm2dS0(8, groups=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return _randomize(m), (_x(2, 3, 8, 8),)


def stdconv_net():
    """BiT / NFNet style: weight-standardised convs (no activation norms)."""
    m = nn.Sequential(StdConv2d(3, 8, 3), nn.ReLU(), ScaledStdConv2d(8, 8, 3), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return m.eval(), (_x(2, 3, 8, 8),)


class ConvNextBlock(nn.Module):
    """torchvision-style ConvNeXt stem + downsample: conv -> LayerNorm2d -> 1x1 conv."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.norm = LayerNorm2d(c)
        self.pw = nn.Conv2d(c, 2 * c, 1)
        self.head_norm = ConvNextLayerNorm(2 * c, data_format="channels_first")
        self.head = nn.Linear(2 * c, 3)

    def forward(self, x):
        x = self.pw(self.norm(self.stem(x)))
        x = self.head_norm(x)
        return self.head(x.mean((2, 3)))


def convnext_block():
    return _randomize(ConvNextBlock()), (_x(2, 3, 16, 16),)


# --------------------------------------------------------------------------- FX feature extraction
# torchvision.models.feature_extraction.DualGraphModule / create_feature_extractor, as timm's
# FeatureGraphNet (timm.create_model(..., features_only=True, feature_cls="fx")) uses them.


class DropPath(nn.Module):
    """timm ``DropPath``: stochastic depth; its forward branches on ``self.training``, so an FX
    trace of a model in training mode differs from one in eval mode."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
        if keep_prob > 0.0 and self.scale_by_keep:
            random_tensor.div_(keep_prob)
        return x * random_tensor


class DualGraphModule(torch.fx.GraphModule):
    """torchvision's ``DualGraphModule``: a GraphModule holding a train graph and an eval graph;
    ``train(mode)`` swaps them.  Its ``__deepcopy__`` re-runs ``__init__``, which calls
    ``self.train()``: the copy of an eval-mode module comes back in training mode, with every
    submodule in training mode and the *train* graph."""

    def __init__(self, root: nn.Module, train_graph: torch.fx.Graph, eval_graph: torch.fx.Graph,
                 class_name: str = "GraphModule"):
        super(torch.fx.GraphModule, self).__init__()
        self.__class__.__name__ = class_name
        self.train_graph = train_graph
        self.eval_graph = eval_graph
        for node in chain(iter(train_graph.nodes), iter(eval_graph.nodes)):
            if node.op in ["get_attr", "call_module"]:
                torch.fx.graph_module._copy_attr(root, self, node.target)
        # train mode by default
        self.train()
        self.graph = train_graph
        self._tracer_cls = None

    def train(self, mode=True):
        if mode and not self.training:
            self.graph = self.train_graph
        elif not mode and self.training:
            self.graph = self.eval_graph
        return super().train(mode=mode)

    def _deepcopy_init(self):
        return DualGraphModule.__init__

    def __deepcopy__(self, memo):
        res = type(self).__new__(type(self))
        memo[id(self)] = res
        fake_mod = torch.fx.graph_module._CodeOnlyModule(copy.deepcopy(self.__dict__, memo))
        self._deepcopy_init()(res, fake_mod, fake_mod.__dict__["train_graph"], fake_mod.__dict__["eval_graph"])
        res.meta = copy.deepcopy(getattr(self, "meta", {}), memo)
        return res


class _LeafTracer(torch.fx.Tracer):
    """torchvision's ``NodePathTracer`` with timm's leaf modules (``register_notrace_module``:
    ``BatchNormAct2d`` stays one ``call_module`` node)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, BatchNormAct2d) or super().is_leaf_module(m, qualname)


def create_feature_extractor(model: nn.Module, return_nodes: dict[str, str]) -> DualGraphModule:
    """torchvision's ``create_feature_extractor`` (the parts timm uses): trace ``model`` in
    training and in eval mode, return the outputs of the modules named in ``return_nodes``
    (``{module name: output key}``) as a dict, and hold both graphs."""
    mode = model.training
    graphs = []
    for training in (True, False):
        model.train(training)
        graph = _LeafTracer().trace(model)
        picked = {}
        for node in graph.nodes:
            if node.op == "call_module" and node.target in return_nodes:
                picked[return_nodes[node.target]] = node
        for node in list(graph.nodes):
            if node.op == "output":
                graph.erase_node(node)
        graph.output(picked)
        graph.lint()
        graphs.append(graph)
    model.train(mode)
    out = DualGraphModule(model, graphs[0], graphs[1], class_name=type(model).__name__)
    out.train(mode)
    return out


class _FeatBlock(nn.Module):
    """A residual block with timm's stochastic depth: x + drop_path(bn2(pw(bn(conv(x)))))."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn = BatchNormAct2d(c)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.drop_path = DropPath(0.5)

    def forward(self, x):
        return x + self.drop_path(self.bn2(self.pw(self.bn(self.conv(x)))))


class FeatureGraphNet(nn.Module):
    """timm's ``FeatureGraphNet``: ``self.graph_module = create_feature_extractor(model, ...)``;
    the forward returns the feature maps as a list."""

    def __init__(self, model: nn.Module, return_nodes: dict[str, str]):
        super().__init__()
        self.graph_module = create_feature_extractor(model, return_nodes)

    def forward(self, x):
        return list(self.graph_module(x).values())


def feature_graph_net():
    """timm ``features_only=True, feature_cls="fx"`` on a small conv/BatchNorm net whose blocks
    have DropPath (so its train graph and eval graph differ)."""
    body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         _FeatBlock(8), nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                         nn.ReLU(), _FeatBlock(16), nn.ReLU())
    _randomize(body)
    net = FeatureGraphNet(body, {"2": "stem", "6": "stage1", "8": "stage2"})
    return net.eval(), (_x(2, 3, 16, 16),)


# --------------------------------------------------------------------------- --arch factories (module only)

def timm_bnact_model():
    return timm_bnact_net()[0]


def conv2dsame_model():
    return conv2dsame_net()[0]


def convnext_model():
    return convnext_block()[0]
