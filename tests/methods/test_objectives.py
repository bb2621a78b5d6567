"""Reconstruction objectives: hand-computed losses, the float model's sensitivity pass, and the seam."""
import math

import pytest
import torch
from torch import nn

from vitquant.calibration.engine import UnitInputs
from vitquant.errors import VitquantError
from vitquant.methods.aphq_vit import APHObjective
from vitquant.methods.fima_q import FisherDPLRObjective
from vitquant.methods.objectives import HeadKL, Objective, UnitJob, kl_to_float, make_objective, rest_gradients
from vitquant.methods.reconstruction import ReconstructionOptions


class Toy(nn.Module):
    """unit → LayerNorm → linear head: a pre-norm model's shape, small enough to differentiate exactly."""

    def __init__(self, d: int = 6, tokens: int = 3, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.unit = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d * tokens, classes)

    def rest(self, o: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(o).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.unit(x))


def _perturbed(unit: nn.Linear) -> nn.Linear:
    """A stand-in for the quantized unit: the float one with its weights perturbed."""
    out = nn.Linear(unit.in_features, unit.out_features)
    with torch.no_grad():
        out.weight.copy_(unit.weight + 0.05 * torch.randn_like(unit.weight))
        out.bias.copy_(unit.bias)
    return out


def _job(model: Toy, x: torch.Tensor, unit: nn.Module | None = None, iters: int = 10) -> UnitJob:
    with torch.no_grad():
        f_out = model.unit(x)
        logits = model(x)
    calls = UnitInputs([((x,), {})])
    return UnitJob("unit", unit or model.unit, model, x, calls, f_out, calls, 4, -1, iters, 0, False,
                   lambda: logits)


def test_mse_and_kl_losses_by_hand():
    model, x = Toy(), torch.randn(5, 3, 6)
    job = _job(model, x)
    mse = Objective()
    mse.begin(job)
    out = job.f_out + 0.5
    assert float(mse.loss(out, slice(None))) == pytest.approx(0.25 * 6)  # summed over 6 channels
    assert mse.measure(nn.Sequential(job.unit, _Shift(0.5))) == pytest.approx(0.25)

    kl = HeadKL()
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4)
    kl.begin(UnitJob("head", nn.Identity(), model, x[:1], None, logits, None, 1, -1, 0, 0, True, lambda: logits))
    uniform = torch.zeros(1, 2)  # softmax (1/2, 1/2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(kl.loss(uniform, slice(None))) == pytest.approx(expected, rel=1e-5)
    assert float(kl.loss(logits, slice(None))) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(VitquantError, match="logits"):
        HeadKL().begin(job)  # a token output is not logits


class _Shift(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x):
        return x + self.c


def test_rest_gradients_equal_autograd_through_the_rest_of_the_model():
    model, x = Toy(), torch.randn(6, 3, 6)
    job = _job(model, x)
    fp = job.float_logits()
    o = job.f_out + 0.1 * torch.randn_like(job.f_out)
    batches = []
    for out, leaf, grad in rest_gradients(model, "unit", x, fp, 4, lambda a, k, out, b: o[4 * b:4 * b + len(out)]):
        rows = slice(4 * len(batches), 4 * len(batches) + len(out))
        assert torch.equal(out, job.f_out[rows])  # the float output the replacement took the place of
        ref = o[rows].clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(kl_to_float(model.rest(ref), fp[rows]), ref)
        assert torch.allclose(grad, expected, atol=1e-7)
        assert torch.equal(leaf, o[rows])
        batches.append(len(out))
    assert batches == [4, 2]  # every image, in batches of 4
    # at the float output itself the KL is at its minimum: no gradient
    for _out, _leaf, grad in rest_gradients(model, "unit", x, fp, 8, lambda a, k, out, b: out):
        assert grad.abs().max() < 1e-6


def _exact_hessian_abs(model: Toy, o: torch.Tensor, fp: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """|H v| per image by double backward: the reference the finite difference must match."""
    leaf = o.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kl_to_float(model.rest(leaf), fp), leaf, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), leaf)
    return hv.abs()


def test_aph_map_is_the_mean_hessian_vector_product_and_the_ones_direction_is_blind_after_a_layernorm():
    model, x = Toy(), torch.randn(16, 3, 6)
    job = _job(model, x)
    aph = APHObjective()
    h = aph.hessian_map(job)  # un-normalised map
    v = torch.cat([aph.direction(job, job.f_out[s:s + 4], s // 4) for s in range(0, 16, 4)])
    exact = _exact_hessian_abs(model, job.f_out, job.float_logits(), v).mean(0)
    assert torch.nn.functional.cosine_similarity(h.flatten(), exact.flatten(), 0) > 0.999
    assert float(h.sum() / exact.sum()) == pytest.approx(1.0, rel=1e-2)
    # the official direction (every element +ε): a LayerNorm removes it, so the map is ~0 (rounding only)
    ones = APHObjective(probe="ones").hessian_map(job)
    assert float(ones.abs().mean()) < 1e-3 * float(h.mean())


def test_aph_loss_weights_elements_by_the_map_and_starts_at_two():
    model, x = Toy(), torch.randn(8, 3, 6)
    quantized = _perturbed(model.unit)
    job = _job(model, x, quantized)
    aph = APHObjective()
    aph.begin(job)
    assert float(aph.h.mean()) == pytest.approx(1.0, rel=1e-5)
    # normalised so that the loss over every image is 2 before any step (the official trick)
    with torch.no_grad():
        whole = aph.loss(quantized(x), slice(None))
    assert float(whole) == pytest.approx(2.0, rel=1e-4)
    err = torch.zeros_like(job.f_out)
    err[0, 1, 2] = 1.0
    expected = aph.h[1, 2] / err.numel() / aph.norm
    assert float(aph.loss(job.f_out[:1] + err[:1], slice(0, 1))) == pytest.approx(float(expected) * len(x), rel=1e-5)


def test_fisher_dplr_probe_and_loss_by_hand():
    model, x = Toy(), torch.randn(8, 3, 6)
    quantized = _perturbed(model.unit)
    job = _job(model, x, quantized, iters=10)
    f = FisherDPLRObjective(rank=5)
    f.begin(job)
    assert f.refresh_at == {2, 4, 6, 8} and len(f.g) == 1
    with torch.no_grad():
        o_hat = quantized(x)
    # the probe: mean |∂KL/∂Ô| and mean |Ô − O| over the images
    grads = torch.cat([g for _o, _l, g in rest_gradients(model, "unit", x, job.float_logits(), 4,
                                                          lambda a, k, out, b: quantized(*a))])
    assert torch.allclose(f.g[0], grads.abs().flatten(1).mean(0), atol=1e-9)
    d = (o_hat - job.f_out).abs().flatten(1).mean(0)
    assert torch.allclose(f.d[0], d, atol=1e-7)
    # one probe: the low-rank part is (e·g)² / |d|² per image; both parts normalised to 1 at the probe
    e = (o_hat - job.f_out).abs().flatten(1)
    lr = ((e @ f.g[0]) ** 2 / d.dot(d)).mean()
    assert f.lr0 == pytest.approx(float(lr), rel=1e-4)
    with torch.no_grad():
        assert float(f.loss(o_hat, slice(None))) == pytest.approx(2.0, rel=1e-4)
    f.before_step(3)
    assert len(f.g) == 1  # not a probe step
    f.before_step(4)
    assert len(f.g) == 2 and f.B_inv.shape == (2, 2)
    # a second probe identical to the first (nothing changed): B = ΔΔᵀ is singular, the damping keeps it finite
    assert torch.isfinite(f.B_inv).all()


def test_the_objective_seam_is_validated():
    assert isinstance(make_objective("mse"), Objective)
    assert isinstance(make_objective("aph"), APHObjective)
    assert isinstance(make_objective(lambda: HeadKL(2.0)), HeadKL)
    with pytest.raises(VitquantError, match="unknown reconstruction objective"):
        make_objective("hessian")
    with pytest.raises(VitquantError, match="objective must be one of"):
        ReconstructionOptions(objective="hessian")
    with pytest.raises(VitquantError, match="head_objective"):
        ReconstructionOptions(head_objective=3)
    ReconstructionOptions(objective=APHObjective(), head_objective="kl")
