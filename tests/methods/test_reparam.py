import torch

from vitquant.methods.reparam import fold_channel_affine
from vitquant.models import prepare


def test_fold_channel_affine_is_lossless_in_float(tiny_vit):
    x = torch.randn(4, 1, 28, 28)
    ref = tiny_vit(x)
    q = prepare(tiny_vit)
    gen = torch.Generator().manual_seed(0)
    for pair in q.structure.mappings:
        dim = q.submodule(pair.norm).weight.numel()
        r = torch.rand(dim, generator=gen) * 4 + 0.1
        b = torch.randn(dim, generator=gen)
        fold_channel_affine(q.submodule(pair.norm), [q.submodule(n) for n in pair.layers], r, b)
    with torch.no_grad(), q.bypassed():
        assert torch.allclose(q(x), ref, atol=1e-5)
