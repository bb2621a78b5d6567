"""`noisyquant`: NoisyQuant, Liu et al., "NoisyQuant: Noisy Bias-Enhanced Post-Training Activation
Quantization for Vision Transformers", CVPR 2023 (official "simple implementation":
kriskrisliu/NoisyQuant, fast_quant.py).

Recipe:
1. Weights: per-output-channel symmetric min-max (every Linear and the patch-embedding conv).
2. Each Linear input except the head's: a symmetric uniform quantizer whose clip value is grid-searched
   (clip = absmax·i/steps, i = steps…1, step Δ = clip/(2^(k−1) − 1)) to minimize the layer-output MSE;
   then a fixed per-channel noisy bias N ~ U(−Δ/2, Δ/2) is sampled once (seeded by `config.seed`) and
   the input becomes Q(x + N) − N (quantizers/noisy.py). `fold_noisy_bias` moves −W·N into the bias
   for deployment.
3. The head input gets the same clip search without a noisy bias (the paper and code exclude the head
   from NoisyQuant).
4. Matmul inputs (q, k, v and the softmax output) and the image: see below.

Choices and deviations:
- Matmuls: the paper's ViT experiments and the released code leave Q·Kᵀ and probs·V in float. This
  library's standard protocol (the "WxAy" of every other method) quantizes the inputs of every matmul,
  so by default (`matmuls="uniform"`) q, k, v and the softmax output get the same per-tensor asymmetric
  min-max quantizers as the `minmax` method, and NoisyQuant is applied where the paper applies it; the
  comparison with other methods is then like for like and the gain over `minmax` is NoisyQuant's own.
  `matmuls="float"` is the paper/code setting.
- The code quantizes neither the head nor the patch-embedding conv; here their weights are quantized
  (every saved layer must have integer codes), the head input by clip search, and the image by
  `QuantConfig.patch_embed_input_bits` (per-tensor asymmetric min-max, or float when None).
- Noise: `noise="uniform"` is the paper's U(−Δ/2, Δ/2). `noise="code"` is the released code: a Gaussian
  N₀ = (randn·2 − 1)·Δ, then a constant shift m searched over Δ·i/mean_steps, i ∈ [−mean_steps,
  mean_steps), then a multiplier r over i/range_steps, i ∈ [0, 2·range_steps), N = m + r·N₀, both by
  output MSE. The code's grids are clip_steps = 1000, mean_steps = 200, range_steps = 1000; the defaults
  here are 10× coarser to stay fast on a CPU. `noise="none"` keeps only the clip search (the ablation
  baseline: what the noisy bias adds on top of it).
- Every search compares with the float layer output; the code compares with the output computed from
  the float input and the already-quantized weights.
- Rows evaluated (`search_macs`): each search measures the output error on a seeded sample of the
  layer's input rows (as in ptq4vit.py: 2^27 multiply-adds per candidate, at least 256 rows; the
  reference models are evaluated whole); the clip grid spans the largest |x| of every row.
  `search_macs=0` evaluates every row. Measured effect: benchmarks/results/calibration_cost.md.
- The base quantizer is the narrow symmetric grid ±(2^(k−1) − 1); the code also allows −2^(k−1), which
  its own search never uses (it clamps at ±clip first).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vitquant.calibration.engine import observe_float
from vitquant.errors import VitquantError
from vitquant.methods.base import Method
from vitquant.methods.grid_search import SEARCH_MACS, grid_argmin, search_rows
from vitquant.methods.steps import capture_by_units, fit_site, fit_weights
from vitquant.models.qmodules import QuantLinear
from vitquant.quantizers import RangeRule, UniformQuantizer
from vitquant.quantizers.noisy import NoisyBiasQuantizer, denoising_bias

_EPS = 1e-8


@dataclass
class NoisyQuantOptions:
    noise: str = "uniform"  # "uniform": U(−Δ/2, Δ/2) (paper); "code": the released code's search; "none": ablation
    matmuls: str = "uniform"  # "uniform": q/k/v/softmax by min-max (standard protocol); "float": as the paper
    clip_steps: int = 100  # clip grid absmax·i/clip_steps (code: 1000)
    mean_steps: int = 20  # noise="code" only (code: 200)
    range_steps: int = 100  # noise="code" only (code: 1000)
    batch_size: int = 32  # images per capture forward (memory only)
    search_macs: int = SEARCH_MACS  # multiply-adds per candidate evaluation (row sample); 0: every row

    def __post_init__(self) -> None:
        if self.noise not in ("uniform", "code", "none"):
            raise ValueError(f"noise must be 'uniform', 'code' or 'none', not {self.noise!r}")
        if self.matmuls not in ("uniform", "float"):
            raise ValueError(f"matmuls must be 'uniform' or 'float', not {self.matmuls!r}")
        if min(self.clip_steps, self.mean_steps, self.range_steps, self.batch_size) < 1:
            raise ValueError("clip_steps, mean_steps, range_steps and batch_size must be >= 1")
        if not isinstance(self.search_macs, int) or self.search_macs < 0:
            raise ValueError(f"search_macs must be an integer >= 0 (0: every row), got {self.search_macs!r}")


def symmetric_narrow(x: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    n = 2 ** (bits - 1) - 1
    return (x / scale).round_().clamp_(-n, n).mul_(scale)


@torch.no_grad()
def fold_noisy_bias(layer: QuantLinear) -> None:
    """Deployment form of a NoisyQuant Linear: b ← b − Ŵ·N and the input quantizer stops removing N,
    so the layer computes Ŵ·Q(x + N) + b − Ŵ·N, the same function in exact arithmetic."""
    q = layer.input_site.quantizer
    if not isinstance(q, NoisyBiasQuantizer):
        raise VitquantError(f"layer {layer.name!r} has no noisy-bias input quantizer to fold")
    if not q.denoise:
        raise VitquantError(f"layer {layer.name!r}: its noisy bias is already folded into the bias")
    new_bias = denoising_bias(layer.qweight().detach(), layer.bias, q.noise)
    if layer.bias is None:
        layer.bias = torch.nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)
    q.denoise = False


class NoisyQuant(Method):
    name = "noisyquant"
    summary = "NoisyQuant (CVPR'23): fixed uniform noisy bias before each Linear-input quantizer"
    Options = NoisyQuantOptions

    def calibrate(self, ctx) -> None:
        qmodel, config = ctx.qmodel, ctx.config
        self.opts = opts = self.options(config)
        self.plan, self.seed = ctx.plan, config.seed
        if ctx.plan.deployable and opts.noise != "none":
            raise VitquantError("noisyquant: a noisy bias Q(x + N) − N has no exact ONNX QDQ form, so it cannot be "
                                "calibrated with deployable=True; use deployable=False, or options={'noise': 'none'}")
        batches = ctx.batches(opts.batch_size)
        fit_weights(qmodel, ctx.plan, RangeRule("minmax"), symmetric=True)
        self._fit_other_sites(ctx, batches)
        linears = [l for l in qmodel.weight_layers().values() if isinstance(l, QuantLinear)]
        index = {l.name: i for i, l in enumerate(linears)}
        units = [u for u in ctx.structure.units if any(n in index for n in u.layers)]
        rows = lambda l: search_rows(l.in_features, l.out_features, opts.search_macs)  # noqa: E731
        # every Linear of a unit, no cores: a unit's captures hold only its Linear inputs
        only_linears = [type(u)(u.name, tuple(n for n in u.layers if n in index), (), u.chained) for u in units]
        captures = capture_by_units(qmodel, only_linears, ctx.images(), opts.batch_size, False, rows, seed=config.seed)
        for _, caps, _ in tqdm(captures, total=len(units), desc="noisyquant", unit="unit", disable=not ctx.progress,
                               leave=False):
            for name, cap in caps.items():
                self._calibrate_linear(qmodel.submodule(name), cap, index[name])

    def _fit_other_sites(self, ctx, batches) -> None:
        """Matmul operands and conv inputs: per-tensor asymmetric min-max (as `minmax`), or float."""
        sites = []
        linear_inputs = {f"{n}.input" for n, l in ctx.qmodel.weight_layers().items() if isinstance(l, QuantLinear)}
        for site in ctx.qmodel.act_sites().values():
            if site.name in linear_inputs:
                continue  # NoisyQuant's own: searched below
            bits = ctx.plan.act(site.name)
            quantize = bits is not None and (self.opts.matmuls == "uniform" or site.role not in (
                "qk", "v", "post_softmax", "attn_weights", "matmul"))
            site.enabled, site.quantizer = quantize, None
            if quantize:
                sites.append(site)
        if not sites:
            return
        observers = observe_float(ctx.qmodel, batches, sites=sites, seed=ctx.config.seed, progress=False,
                                  sample=lambda site: False)  # min-max: the extremes suffice
        for site in sites:
            fit_site(site, UniformQuantizer(ctx.plan.act(site.name)), observers[site.name], RangeRule("minmax"),
                     ctx.device)

    def _calibrate_linear(self, layer: QuantLinear, cap, index: int) -> None:
        ab, opts = self.plan.act(layer.input_site.name), self.opts
        if ab is None:
            layer.input_site.enabled, layer.input_site.quantizer = False, None
            return
        x = cap.x.reshape(-1, layer.in_features)
        # the clip grid spans the largest |x| of every row, also when the error is measured on a sample
        absmax = torch.maximum(cap.lo.abs(), cap.hi.abs()).max() if cap.lo is not None else x.abs().max()
        w = layer.weight.detach()
        bias = layer.bias.detach() if layer.bias is not None else torch.zeros(layer.out_features, device=w.device)
        wq = layer.weight_quantizer.fake_quant(w)
        ref = F.linear(x, w, bias)
        search = _OutputSearch(x, wq, bias, ref)

        # 1. clip: absmax·i/steps, i = steps…1 (descending: ties keep the larger clip, as the code does)
        n = 2 ** (ab - 1) - 1
        clips = absmax.clamp_min(_EPS) * torch.arange(opts.clip_steps, 0, -1, device=absmax.device) / opts.clip_steps
        step = float(search.best(clips, lambda xs, c: symmetric_narrow(xs, c / n, ab))) / n
        base = UniformQuantizer(ab, symmetric=True, name=layer.input_site.name)
        base.set_params(torch.tensor(step), torch.tensor(0.0))
        site = layer.input_site
        site.enabled = True
        if site.role == "head" or opts.noise == "none":  # the head is not a NoisyQuant layer
            site.quantizer = base
            return

        # 2. the noisy bias, sampled once per layer (drawn on the CPU, so the same on every device)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + index)
        if opts.noise == "uniform":
            noise = (torch.rand(layer.in_features, generator=gen).to(w.device) - 0.5) * step
        else:
            noise = self._code_noise(search, step, gen, ab)
        site.quantizer = NoisyBiasQuantizer(base, noise, channel_axis=-1, name=site.name)

    def _code_noise(self, search: "_OutputSearch", step: float, gen: torch.Generator, ab: int) -> torch.Tensor:
        """The released code's noise: Gaussian draw, then a searched constant shift and range multiplier."""
        opts = self.opts
        device = search.x.device
        raw = (torch.randn(search.x.shape[1], generator=gen).to(device) * 2 - 1) * step

        def denoised(xs, noise):  # Q(x + N) − N
            return symmetric_narrow(xs + noise, step, ab).sub_(noise)

        means = step * torch.arange(-opts.mean_steps, opts.mean_steps, device=device) / opts.mean_steps
        mean = search.best(means, denoised)
        ranges = torch.arange(0, 2 * opts.range_steps, device=device) / opts.range_steps
        r = search.best(ranges, lambda xs, c: denoised(xs, mean + raw * c))
        return mean + raw * r


class _OutputSearch:
    """argmin over scalar candidates c of ‖F.linear(f(x, c), Ŵ, b) − y_FP‖² on the calibration rows."""

    def __init__(self, x: torch.Tensor, wq: torch.Tensor, bias: torch.Tensor, ref: torch.Tensor) -> None:
        self.x, self.wq, self.bias, self.ref = x, wq, bias, ref

    def best(self, candidates: torch.Tensor, transform) -> torch.Tensor:
        def err(c, items):  # c: [k, 1], broadcast over [k, rows, in]
            x_hat = transform(self.x[items][None], c.reshape(-1, 1, 1))
            return F.linear(x_hat, self.wq, self.bias).sub_(self.ref[items][None]).square_().sum(dim=(1, 2))[:, None]

        per_row = self.x.shape[1] + self.ref.shape[1]
        return grid_argmin(candidates.float()[:, None], self.x.shape[0], per_row, err)[0]
