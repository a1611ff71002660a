"""Small faithful rebuilds of Hugging Face transformer structures (no ``transformers`` needed).

Each model is untraceable by ``torch.fx.symbolic_trace`` the way HF's are: forwards take
``**kwargs``, branch on an input's shape, and return a ``ModelOutput``-like dataclass; their
blocks' forwards do the same, so FX sees none of the norms' producers and consumers and only a
``torch.export`` graph of the example inputs can prove them.

* :class:`BertLikeModel` -- post-LN encoder (BERT, MiniLM): embeddings -> LayerNorm; each layer
  ``LayerNorm(attn(h) + h)``, ``LayerNorm(ffn(a) + a)``.  Every LayerNorm output feeds the next
  Linear(s) *and* a residual add: nothing is foldable.  ``pre_ln=True`` is the pre-LN variant
  (``h + attn(ln(h))``): the block LayerNorms feed only q/k/v resp. the intermediate Linear.
* :class:`GPT2LikeModel` -- GPT-2 blocks with HF's ``Conv1D`` (weight (in, out)):
  ``ln_1 -> attn.c_attn``, ``ln_2 -> mlp.c_fc`` are foldable, ``ln_f`` (model output) is not.
  :class:`GPT2LikeLMHeadModel` adds an ``lm_head`` tied to ``wte`` after ``ln_f``.
* :class:`ResNetLikeBackbone` -- HF ``ResNetBackbone`` (``AutoBackbone``; RT-DETR's, DETR's and
  HGNetV2's backbones answer the same way): conv -> BatchNorm -> ReLU layers whose forward
  returns a :class:`BackboneOutput` -- a ``ModelOutput`` (an ``OrderedDict`` dataclass) whose only
  field set is ``feature_maps``, a *tuple* of tensors: no tensor among the output's values.
* :class:`WeightStandardizedConv2d` -- HF BiT's (ViT-hybrid, DPT-hybrid) weight-standardised conv,
  with its optional :class:`DynamicPad2d` (TF 'same' padding); :func:`bit_like_stem` uses both.
* :class:`LlamaLikeModel` -- Llama blocks with an RMSNorm written like HF's ``LlamaRMSNorm``
  (a "custom" norm to normswap): ``input_layernorm -> q/k/v_proj`` and
  ``post_attention_layernorm -> gate_proj/up_proj`` are foldable, the final ``norm`` is not.
  ``gemma_norm=True`` uses a Gemma-style ``(1 + weight)`` RMSNorm instead, which must stay refused.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BaseModelOutput", "ModelOutput", "BackboneOutput", "ResNetLikeBackbone", "DynamicPad2d",
    "WeightStandardizedConv2d", "bit_like_stem", "Conv1D", "LlamaLikeRMSNorm", "GemmaLikeRMSNorm",
    "BertLikeModel", "GPT2LikeModel", "GPT2LikeLMHeadModel", "LlamaLikeModel",
    "example_ids", "fx_fails",
]


@dataclass
class BaseModelOutput:
    """Like ``transformers.modeling_outputs.BaseModelOutput`` (a dataclass output)."""

    last_hidden_state: torch.Tensor
    logits: Optional[torch.Tensor] = None


# HF registers every ModelOutput subclass as a pytree node (so torch.export can return it)
torch.utils._pytree.register_dataclass(BaseModelOutput)


class ModelOutput(OrderedDict):
    """Like ``transformers.utils.ModelOutput``: a dataclass that is also an ``OrderedDict`` of its
    fields that are not None (in field order), registered as a pytree node by its subclasses."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        torch.utils._pytree.register_pytree_node(
            cls, lambda o: (list(o.values()), list(o.keys())),
            lambda values, keys, _cls=cls: _cls(**dict(zip(keys, values))),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                self[f.name] = v

    def to_tuple(self) -> tuple:
        return tuple(self[k] for k in self.keys())


@dataclass
class BackboneOutput(ModelOutput):
    """``transformers.modeling_outputs.BackboneOutput``: ``feature_maps`` is a tuple of tensors."""

    feature_maps: Optional[tuple] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


def _check_len(x: torch.Tensor, max_len: int) -> None:
    # control flow on an input's shape (HF checks sequence lengths like this): FX cannot trace it
    if x.shape[1] > max_len:
        raise ValueError(f"sequence length {x.shape[1]} > {max_len}")


class Conv1D(nn.Module):
    """HF ``transformers.pytorch_utils.Conv1D``: a Linear with its weight transposed (in, out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.nx = nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


from samples.models import LlamaRMSNorm as LlamaLikeRMSNorm  # noqa: E402  (HF's LlamaRMSNorm, one rebuild)


class GemmaLikeRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + weight)`` -- not weight alone."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial norm affines (trained models have them) and small random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _attention(q, k, v, heads: int, mask=None, causal: bool = False):
    b, s, d = q.shape
    hd = d // heads
    q, k, v = (t.view(b, s, heads, hd).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if mask is not None:
        scores = scores + (1.0 - mask[:, None, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(b, s, d)


# --------------------------------------------------------------------------- BERT-like


class BertLikeEmbeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_pos: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_pos, hidden)
        self.token_type_embeddings = nn.Embedding(2, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(0.1)
        self.max_pos = max_pos

    def forward(self, input_ids, token_type_ids=None, **kwargs):
        _check_len(input_ids, self.max_pos)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        e = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(e))


class BertLikeSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        _check_len(hidden_states, 4096)
        return _attention(self.query(hidden_states), self.key(hidden_states), self.value(hidden_states),
                          self.heads, attention_mask)


class BertLikeLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int, pre_ln: bool):
        super().__init__()
        self.pre_ln = pre_ln
        self.attention = BertLikeSelfAttention(hidden, heads)
        self.attention_output = nn.Linear(hidden, hidden)
        self.attention_LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.intermediate = nn.Linear(hidden, inter)
        self.output = nn.Linear(inter, hidden)
        self.output_LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        _check_len(hidden_states, 4096)
        if self.pre_ln:  # h + attn(ln(h)); a + ffn(ln(a))
            a = hidden_states + self.dropout(self.attention_output(
                self.attention(self.attention_LayerNorm(hidden_states), attention_mask)))
            return a + self.dropout(self.output(F.gelu(self.intermediate(self.output_LayerNorm(a)))))
        # post-LN (BERT): LayerNorm(attn(h) + h): the LayerNorm output is the next residual
        attn = self.attention(hidden_states, attention_mask)
        a = self.attention_LayerNorm(self.dropout(self.attention_output(attn)) + hidden_states)
        return self.output_LayerNorm(self.dropout(self.output(F.gelu(self.intermediate(a)))) + a)


class BertLikeModel(nn.Module):
    def __init__(self, vocab: int = 50, hidden: int = 32, heads: int = 4, inter: int = 64, layers: int = 2,
                 max_pos: int = 64, pre_ln: bool = False, seed: int = 0):
        super().__init__()
        self.embeddings = BertLikeEmbeddings(vocab, hidden, max_pos)
        self.layer = nn.ModuleList([BertLikeLayer(hidden, heads, inter, pre_ln) for _ in range(layers)])
        self.final_LayerNorm = nn.LayerNorm(hidden) if pre_ln else None
        _randomize(self, seed)

    def forward(self, input_ids, attention_mask=None, **kwargs) -> BaseModelOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.embeddings(input_ids, **kwargs)
        for layer in self.layer:
            h = layer(h, attention_mask)
        if self.final_LayerNorm is not None:
            h = self.final_LayerNorm(h)
        return BaseModelOutput(last_hidden_state=h)


# --------------------------------------------------------------------------- GPT-2-like


class GPT2LikeAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.split_size = hidden
        self.c_attn = Conv1D(3 * hidden, hidden)
        self.c_proj = Conv1D(hidden, hidden)

    def forward(self, hidden_states, **kwargs):
        _check_len(hidden_states, 4096)
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        return self.c_proj(_attention(q, k, v, self.heads, causal=True))


class GPT2LikeMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.c_fc = Conv1D(inter, hidden)
        self.c_proj = Conv1D(hidden, inter)

    def forward(self, hidden_states):
        return self.c_proj(F.gelu(self.c_fc(hidden_states), approximate="tanh"))


class GPT2LikeBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-5)
        self.attn = GPT2LikeAttention(hidden, heads)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-5)
        self.mlp = GPT2LikeMLP(hidden, inter)

    def forward(self, hidden_states, **kwargs):
        _check_len(hidden_states, 4096)
        residual = hidden_states  # pre-LN: the residual is the LayerNorm's *input*
        hidden_states = self.attn(self.ln_1(hidden_states)) + residual
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2LikeModel(nn.Module):
    def __init__(self, vocab: int = 50, hidden: int = 32, heads: int = 4, layers: int = 2, max_pos: int = 64,
                 seed: int = 0):
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(max_pos, hidden)
        self.drop = nn.Dropout(0.1)
        self.h = nn.ModuleList([GPT2LikeBlock(hidden, heads, 4 * hidden) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(hidden)
        self.max_pos = max_pos
        _randomize(self, seed)

    def forward(self, input_ids, **kwargs) -> BaseModelOutput:
        _check_len(input_ids, self.max_pos)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        h = self.drop(self.wte(input_ids) + self.wpe(pos))
        for block in self.h:
            h = block(h)
        return BaseModelOutput(last_hidden_state=self.ln_f(h))


class GPT2LikeLMHeadModel(nn.Module):
    """GPT-2 with an ``lm_head`` Linear whose weight is tied to ``transformer.wte``."""

    def __init__(self, tie: bool = True, **kw):
        super().__init__()
        self.transformer = GPT2LikeModel(**kw)
        vocab, hidden = self.transformer.wte.weight.shape
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.transformer.wte.weight
        else:
            with torch.no_grad():
                self.lm_head.weight.copy_(self.transformer.wte.weight)
        self.eval()

    def forward(self, input_ids, **kwargs) -> torch.Tensor:
        h = self.transformer(input_ids, **kwargs).last_hidden_state
        return self.lm_head(h)  # logits only (as GPT2LMHeadModel's loss-free output without hidden states)


# --------------------------------------------------------------------------- Llama-like


class LlamaLikeAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, hidden_states, **kwargs):
        _check_len(hidden_states, 4096)
        return self.o_proj(_attention(self.q_proj(hidden_states), self.k_proj(hidden_states),
                                      self.v_proj(hidden_states), self.heads, causal=True))


class LlamaLikeMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLikeDecoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int, norm_cls):
        super().__init__()
        self.self_attn = LlamaLikeAttention(hidden, heads)
        self.mlp = LlamaLikeMLP(hidden, inter)
        self.input_layernorm = norm_cls(hidden)
        self.post_attention_layernorm = norm_cls(hidden)

    def forward(self, hidden_states, **kwargs):
        _check_len(hidden_states, 4096)
        residual = hidden_states
        hidden_states = residual + self.self_attn(self.input_layernorm(hidden_states), **kwargs)
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


class LlamaLikeModel(nn.Module):
    def __init__(self, vocab: int = 50, hidden: int = 32, heads: int = 4, inter: int = 48, layers: int = 2,
                 gemma_norm: bool = False, seed: int = 0):
        super().__init__()
        norm_cls = GemmaLikeRMSNorm if gemma_norm else LlamaLikeRMSNorm
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList([LlamaLikeDecoderLayer(hidden, heads, inter, norm_cls) for _ in range(layers)])
        self.norm = norm_cls(hidden)
        _randomize(self, seed)
        if gemma_norm:
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, GemmaLikeRMSNorm):
                        m.weight.sub_(1)  # (1 + weight) around 1

    def forward(self, input_ids, **kwargs) -> BaseModelOutput:
        _check_len(input_ids, 4096)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, **kwargs)
        return BaseModelOutput(last_hidden_state=self.norm(h))


# --------------------------------------------------------------------------- ResNetBackbone-like


class ResNetLikeConvLayer(nn.Module):
    """HF ``ResNetConvLayer``: convolution -> normalization (BatchNorm2d) -> activation."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, activation: bool = True):
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.normalization = nn.BatchNorm2d(cout)
        self.activation = nn.ReLU() if activation else nn.Identity()

    def forward(self, input):
        return self.activation(self.normalization(self.convolution(input)))


class ResNetLikeBasicLayer(nn.Module):
    """HF ``ResNetBasicLayer``: two conv layers and a (1x1 conv + BatchNorm) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                         if cin != cout or stride != 1 else nn.Identity())
        self.layer = nn.Sequential(ResNetLikeConvLayer(cin, cout, stride=stride),
                                   ResNetLikeConvLayer(cout, cout, activation=False))
        self.activation = nn.ReLU()

    def forward(self, hidden_state):
        residual = self.shortcut(hidden_state)
        hidden_state = self.layer(hidden_state)
        hidden_state += residual
        return self.activation(hidden_state)


class ResNetLikeBackbone(nn.Module):
    """HF ``ResNetBackbone`` (``AutoBackbone.from_config(ResNetConfig(out_features=...))``): stem
    (7x7 conv layer + max pool), one basic layer per stage; the forward takes ``**kwargs`` and
    returns ``BackboneOutput(feature_maps=(...))`` with the maps of the ``out_features`` stages."""

    def __init__(self, channels: int = 3, embedding_size: int = 8, hidden_sizes=(8, 16, 32),
                 out_features=("stage1", "stage2", "stage3"), seed: int = 0):
        super().__init__()
        self.num_channels = channels
        self.embedder = ResNetLikeConvLayer(channels, embedding_size, kernel_size=7, stride=2)
        self.pooler = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        sizes = [embedding_size, *hidden_sizes]
        self.stages = nn.ModuleList([ResNetLikeBasicLayer(a, b, stride=1 if i == 0 else 2)
                                     for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))])
        self.stage_names = ["stem"] + [f"stage{i + 1}" for i in range(len(hidden_sizes))]
        self.out_features = list(out_features)
        with torch.no_grad():  # trained-looking statistics and affines
            g = torch.Generator().manual_seed(seed)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                    m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                    m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
        self.eval()

    def forward(self, pixel_values, output_hidden_states=None, return_dict=None, **kwargs) -> BackboneOutput:
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError("Make sure that the channel dimension of the pixel values match with the one set "
                             "in the configuration.")
        h = self.pooler(self.embedder(pixel_values))
        hidden_states = (h,)
        for stage in self.stages:
            h = stage(h)
            hidden_states += (h,)
        feature_maps = tuple(hs for name, hs in zip(self.stage_names, hidden_states) if name in self.out_features)
        return BackboneOutput(feature_maps=feature_maps,
                              hidden_states=hidden_states if output_hidden_states else None, attentions=None)


# --------------------------------------------------------------------------- BiT-like


class DynamicPad2d(nn.Module):
    """HF ``transformers.models.bit.modeling_bit.DynamicPad2d``: TF 'same' padding computed from
    the input size at every call."""

    def __init__(self, kernel_size, stride, dilation, value=0):
        super().__init__()
        self.kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.stride = (stride, stride) if isinstance(stride, int) else stride
        self.dilation = (dilation, dilation) if isinstance(dilation, int) else dilation
        self.value = value

        def compute_padding(x, kernel_size, stride, dilation):
            return max((math.ceil(x / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - x, 0)

        self.compute_padding = compute_padding

    def forward(self, input):
        input_height, input_width = input.size()[-2:]
        padding_height = self.compute_padding(input_height, self.kernel_size[0], self.stride[0], self.dilation[0])
        padding_width = self.compute_padding(input_width, self.kernel_size[1], self.stride[1], self.dilation[1])
        if padding_height > 0 or padding_width > 0:
            input = F.pad(input, [padding_width // 2, padding_width - padding_width // 2,
                                  padding_height // 2, padding_height - padding_height // 2], value=self.value)
        return input


class WeightStandardizedConv2d(nn.Conv2d):
    """HF ``WeightStandardizedConv2d``: ``padding="SAME"`` is static (an int) for stride 1 and an
    odd kernel, else a :class:`DynamicPad2d` child ``pad``; the forward pads, standardises the
    weight per output channel with ``F.batch_norm(w.reshape(1, out, -1), training=True)`` and convolves."""

    def __init__(self, in_channel, out_channels, kernel_size, stride=1, padding="SAME", dilation=1, groups=1,
                 bias=False, eps=1e-6):
        is_dynamic = False
        if isinstance(padding, str) and padding.lower() == "same":
            if stride == 1 and (dilation * (kernel_size - 1)) % 2 == 0:
                padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
            else:
                padding, is_dynamic = 0, True
        elif padding is None:
            padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        super().__init__(in_channel, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias)
        self.pad = DynamicPad2d(kernel_size, stride, dilation) if is_dynamic else None
        self.eps = eps

    def forward(self, hidden_state):
        if self.pad is not None:
            hidden_state = self.pad(hidden_state)
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(hidden_state, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def bit_like_stem(seed: int = 0):
    """A BiT-like stem: a static-padding weight-standardised conv, then one with dynamic 'same'
    padding (stride 2), GroupNorm, head.  Returns (model, example inputs)."""
    torch.manual_seed(seed)
    m = nn.Sequential(WeightStandardizedConv2d(3, 8, 3, eps=1e-8), nn.ReLU(),
                      WeightStandardizedConv2d(8, 16, 3, stride=2, eps=1e-8), nn.GroupNorm(4, 16), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    return m.eval(), (torch.randn(2, 3, 15, 15, generator=torch.Generator().manual_seed(seed)),)


# --------------------------------------------------------------------------- helpers


def example_ids(vocab: int = 50, batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def fx_fails(module: nn.Module) -> str | None:
    """The error ``torch.fx.symbolic_trace`` raises on ``module`` (None: it traces)."""
    try:
        torch.fx.symbolic_trace(module)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None
