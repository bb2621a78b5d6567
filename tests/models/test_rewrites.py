"""Float rewrites before quantization are exact in float: BatchNorm folding (conv and BN-Linear, with a
fused activation kept), only when the BatchNorm is the layer's only reader; structural reparameterization."""
import pytest
import torch
from torch import nn

from vitquant.models import prepare
from vitquant.models.fold import fold_batchnorm, reparameterize_blocks


def _stats(bn: nn.Module, gen: torch.Generator) -> nn.Module:
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3, generator=gen)
        bn.running_var.uniform_(0.3, 3.0, generator=gen)
        if bn.weight is not None:
            bn.weight.normal_(1, 0.2, generator=gen)
            bn.bias.normal_(0, 0.2, generator=gen)
    return bn.eval()


@pytest.mark.parametrize("bias", [True, False])
def test_fold_batchnorm_is_exact_in_float64(bias):
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, groups=1, bias=bias).double()
    bn = _stats(nn.BatchNorm2d(8).double(), gen)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        ref = bn(conv(x))
        fold_batchnorm(conv, bn)
        assert torch.allclose(conv(x), ref, rtol=1e-12, atol=1e-12)
    lin = nn.Linear(5, 4).double()  # LeViT's BN-Linear: a BatchNorm1d over the Linear's outputs
    bn1 = _stats(nn.BatchNorm1d(4).double(), gen)
    t = torch.randn(7, 5, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        ref = bn1(lin(t))
        fold_batchnorm(lin, bn1)
        assert torch.allclose(lin(t), ref, rtol=1e-12, atol=1e-12)


class _ConvBlock(nn.Module):
    def __init__(self, shared: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 4)
        self.shared = shared
        self.pretrained_cfg = {"input_size": (3, 8, 8)}

    def forward(self, x):
        y = self.conv(x)
        z = self.act(self.bn(y))
        if self.shared:  # the conv output has a second reader: folding would change it
            z = z + y
        return self.head(z.mean(dim=(2, 3)))


@pytest.mark.parametrize("shared", [False, True])
def test_prepare_folds_only_an_exclusive_batchnorm(shared):
    model = _ConvBlock(shared)
    _stats(model.bn, torch.Generator().manual_seed(1))
    q = prepare(model)
    folded = [r for r in q.structure.rewrites if "BatchNorm folded" in r]
    assert folded == ([] if shared else ["bn → conv: BatchNorm folded"])
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad(), q.bypassed():
        assert torch.allclose(q(x), model(x), rtol=1e-5, atol=1e-6)
    if not shared:  # the conv's output now feeds the activation directly
        assert isinstance(q.submodule("bn"), nn.Identity)


def test_fused_norm_activation_keeps_its_activation():
    timm = pytest.importorskip("timm")
    m = timm.create_model("resnet18", pretrained=False, num_classes=4, act_layer="silu").eval()
    gen = torch.Generator().manual_seed(2)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            _stats(mod, gen)
    q = prepare(m)
    assert len([r for r in q.structure.rewrites if "BatchNorm folded" in r]) == 20
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), q.bypassed():
        assert torch.allclose(q(x), m(x), rtol=1e-4, atol=1e-5)


def test_structural_reparameterization_is_exact():
    timm = pytest.importorskip("timm")
    m = timm.create_model("fastvit_t8", pretrained=False, num_classes=4).eval().double()
    gen = torch.Generator().manual_seed(3)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            _stats(mod, gen)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        ref = m(x)
        fused = reparameterize_blocks(m)
        assert fused and torch.allclose(m(x), ref, rtol=1e-9, atol=1e-9)
