"""Decoder-style models that return a key/value cache object while config.use_cache is true
(Hugging Face's DynamicCache) export and check with use_cache=False, with a note (issue 11)."""

import torch
from torch import nn

from normswap.check import check
from normswap.export import export


class _Config:
    use_cache = True


class _Cache:  # not a tensor: what the exporters cannot return
    def __init__(self, k):
        self.k = k


class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Config()
        self.emb = nn.Linear(8, 8)
        self.norm = nn.RMSNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.norm(self.emb(x))
        logits = self.head(h)
        if self.config.use_cache:
            return logits, _Cache(h)
        return (logits,)


def test_decoder_with_a_cache_output_exports_and_checks(tmp_path):
    m = TinyDecoder().eval()
    x = torch.randn(2, 3, 8)
    rep = export(m, tmp_path / "d.onnx", (x,))
    assert rep and any("use_cache" in w for w in rep.warnings)
    assert m.config.use_cache is True  # restored
    par = check(m, tmp_path / "d.onnx", (x,), providers=("cpu",))
    assert par and any("use_cache" in n for n in par.notes)
