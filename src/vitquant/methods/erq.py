"""`erq`: ERQ, Zhong et al., "ERQ: Error Reduction for Post-Training Quantization of Vision
Transformers", ICML 2024 (code: zysxmu/ERQ, which now holds the TPAMI'25 extension).

Recipe:
1. RepQ-ViT first (repq_vit.py): its activation quantizers (log√2 post-softmax, layer-wise uniform,
   post-LayerNorm channel-wise → layer-wise reparameterization) and per-channel weight quantizers.
2. Then each Linear in forward order. One streamed pass over the calibration images gives the running
   sums G = AᵀA and P = AᵀY over all tokens, where A = [x̄, 1] (x̄: the layer's quantized input) and
   Y = Wx + b (the float model's output on its float input x). Nothing per token is kept.
   - Aqer (activation quantization error reduction, §4.1): with Θ = [W b], the full-precision weights
     become Θ + ΔΘ with ΔΘᵀ = (G + λI)⁻¹(P − GΘᵀ), the ridge solution of
     min ‖A(Θ+ΔΘ)ᵀ − Y‖² + λ‖ΔΘ‖², λ = 0.1·coe.
   - The weight quantizer is re-fitted on the updated W (RepQ's per-channel percentile-MSE range).
   - Wqer (weight quantization error reduction, §4.2): while input channels remain in float, take the
     first half S of them (R: the rest, plus the bias column). Rounding refinement: per output row,
     starting from round-to-nearest errors δ, greedily flip floor↔ceil where it lowers the proxy
     δᵀ(μμᵀ+Σ)δ = δᵀE[x̄_S x̄_Sᵀ]δ (at most `max_flips` flips). Ridge regression: the float columns R
     absorb the error, δ_R = −(G_RR + λI)⁻¹ G_RS δ_S (G_RR = I₂ᵀI₂, G_RS = I₂ᵀI₁ in the paper).
   The result is integer codes on the layer's own per-channel grid: layer.weight holds their
   dequantized values and is marked frozen, so save/load reproduce it exactly.

Choices and deviations (the full ICML text could not be consulted here; where the summary in
shared/research/ptq_methods.md §2 is silent we follow the released code and say so):
- Sequential statistics (option `sequential`, default True): x̄ is the layer's quantized input in the
  partially quantized model (every earlier Linear already ERQ-quantized, every activation quantizer
  on), so Aqer also corrects the error the earlier layers propagate. The released code instead
  quantizes the float input of each layer, x̄ = Q(x) (`sequential=False`).
  The default was decided from 3 calibration seeds on both outlier-stress variants (benchmarks/results/
  accuracy.md; 1000 test images, one standard error ≈ 0.6 points), top-1 sequential=true / false:
  6-block W4A4 96.17 / 96.07, W3A3 95.90 / 95.67; 12-block (retrained 2026-12-02) W4A4 95.50 / 95.93,
  W3A3 94.80 / 94.70 — no difference beyond noise (the four means sum to the same 382.37). The gap the
  issue reported on the 6-block stress model at W4A4, seed 0 (77.2 true vs 82.7 false; official code 80.5)
  came from the head input's outlier channels, which `reparam_head="auto"` (inherited from repq-vit) now
  reparameterizes; with it both settings are at float accuracy. The default stays True (the paper's
  description); False, the official code's choice, is ~30 % cheaper (3.8 vs 6.5 s on the 6-block model).
- Statistics are streamed sums; the code pickles every layer's inputs and outputs to disk. Same sums.
  Under torchrun each rank sums its range of the statistics batches and the sums are all-reduced (the
  same sums, added in another order; the unit streams before them run whole on every rank).
- The rounding flip follows the paper: flip the coordinate whose gradient 2Cδ has the sign of δ and
  the largest magnitude, keep it only if the proxy decreases (exact one-coordinate change), stop the
  row otherwise. The code snaps δ − g to the nearer of floor/ceil, which flips only when the gradient
  step passes half-way; its acceptance test is the same, so both never increase the proxy.
- μμᵀ + Σ uses the population covariance, i.e. exactly E[x̄x̄ᵀ] = G/n; the code uses torch.cov (n−1).
- Channel halves are taken in index order, as in the released code (an older, commented-out variant
  picks, per output row, the half with the smallest rounding error).
- λ is one value for Aqer and Wqer on every Linear. The code's Aqer uses λ = 0.1 for 2-D inputs (the
  head); `head_coe` reproduces that (head_coe=1.0 → λ = 0.1).
- Linear layers only; the patch-embedding conv keeps RepQ's round-to-nearest (the code also
  ridge-compensates its columns in Wqer).
- Activation quantizers come from our RepQ-ViT (float-model statistics, see repq_vit.py); the code
  fits them lazily in one forward with activations quantized and weights float.
- Linear systems are solved in float64 with torch.linalg.solve (the code inverts in float32).
- λ is absolute, against sums over calib_size × tokens rows (the code's convention), so the same coe
  regularizes relatively more when images have few tokens (17 for the bundled 28×28/7 MNIST ViT, 197
  for DeiT-224), and at 32 images fc2 and the head have more unknowns than rows. ERQ then gains from
  more calibration images: bundled model, outlier-stress W4A4, 32 images 68–83% top-1 across three
  seeds, 128 images 92% (RepQ-ViT 13–15% at either size). Sequential vs the code's parallel inputs
  were within that seed noise there.
- Not implemented: the TPAMI'25 extension's dual uniform quantization ("two-part" weight scales for the
  5% outlier input channels of qkv/fc1).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vitquant import distributed
from vitquant.calibration.engine import UnitInputs, UnitStream, run_unit
from vitquant.methods.repq_vit import RepQOptions, RepQViT
from vitquant.models.qmodules import QuantLinear
from vitquant.profiling import release_memory
from vitquant.quantizers import RangeRule, UniformQuantizer


@dataclass
class ERQOptions(RepQOptions):
    coe: float = 20000.0  # λ = 0.1·coe, the code's --coe (argparse default 20000; its README uses 10000)
    head_coe: float | None = None  # Aqer λ = 0.1·head_coe for the head; None: the one λ of coe
    max_flips: int = 100  # rounding-refinement flips per output row and channel half
    sequential: bool = True  # x̄ from the partially quantized model; False: Q(float input), as the code
    aqer: bool = True
    wqer: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.coe = float(self.coe)
        if self.coe <= 0:
            raise ValueError(f"coe must be > 0 (λ = 0.1·coe regularizes the ridge solves), got {self.coe}")
        if self.head_coe is not None:
            self.head_coe = float(self.head_coe)
            if self.head_coe <= 0:
                raise ValueError(f"head_coe must be > 0 or None, got {self.head_coe}")
        if not isinstance(self.max_flips, int) or self.max_flips < 0:
            raise ValueError(f"max_flips must be an integer ≥ 0, got {self.max_flips!r}")


class RidgeStatistics:
    """Running sums over calibration rows: G = AᵀA and P = AᵀY with A = [x̄, 1] ([x̄] without bias)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None) -> None:
        self.in_features, self.bias = in_features, bias
        k = in_features + int(bias)
        self.gram = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.cross = torch.zeros(k, out_features, dtype=torch.float64, device=device)
        self.rows = 0

    def design(self, x_q: torch.Tensor) -> torch.Tensor:
        x = x_q.reshape(-1, self.in_features)
        if not self.bias:
            return x.double()
        # [x̄, 1] written into one buffer: the values of cat([x̄.double(), 1]) without a second copy
        a = torch.empty(x.shape[0], self.in_features + 1, dtype=torch.float64, device=x.device)
        a[:, :self.in_features].copy_(x)
        a[:, self.in_features] = 1.0
        return a

    def update(self, x_q: torch.Tensor, y: torch.Tensor) -> None:
        a = self.design(x_q)
        self.gram += a.T @ a
        self.cross += a.T @ y.reshape(a.shape[0], -1).double()
        self.rows += a.shape[0]


def _ridge_eye(n: int, lam: float, like: torch.Tensor) -> torch.Tensor:
    return lam * torch.eye(n, dtype=like.dtype, device=like.device)


def aqer_delta(stats: RidgeStatistics, theta: torch.Tensor, lam: float) -> torch.Tensor:
    """ΔΘ [out, in(+1)] minimizing ‖A(Θ+ΔΘ)ᵀ − Y‖² + λ‖ΔΘ‖² (ERQ Aqer), from the streamed sums alone:
    Aᵀ(Y − AΘᵀ) = P − GΘᵀ."""
    rhs = stats.cross - stats.gram @ theta.double().T
    return torch.linalg.solve(stats.gram + _ridge_eye(stats.gram.shape[0], lam, stats.gram), rhs).T


def refine_rounding(delta: torch.Tensor, alt: torch.Tensor, second_moment: torch.Tensor, max_flips: int) -> torch.Tensor:
    """ERQ rounding refinement of each row of `delta` (rounding errors ŵ − w of the selected weights).

    alt: the error of the other rounding direction (equal to delta where none exists: an on-grid or
    clamped weight). Each step flips, per row, the coordinate j with δ_j·g_j > 0 (g = 2Cδ) and the
    largest |g_j| — moving δ_j to the other side lowers the proxy δᵀCδ to first order — and keeps it
    only if the exact change t·g_j + t²C_jj (t = alt_j − δ_j) is negative; a row stops otherwise.
    """
    delta, alt = delta.clone().double(), alt.clone().double()
    c = second_moment.double()
    g = 2 * delta @ c  # c is symmetric
    rows = torch.arange(delta.shape[0], device=delta.device)
    active = torch.ones(delta.shape[0], dtype=torch.bool, device=delta.device)
    diag = c.diagonal()
    for _ in range(max_flips):
        candidate = (g * delta > 0) & (alt != delta) & active[:, None]
        score = torch.where(candidate, g.abs(), torch.zeros_like(g))
        best, j = score.max(dim=1)
        t = alt[rows, j] - delta[rows, j]
        change = t * g[rows, j] + t * t * diag[j]
        accept = (best > 0) & (change < 0)
        active &= accept
        if not bool(accept.any()):
            break
        r, jj, tt = rows[accept], j[accept], t[accept]
        old = delta[r, jj].clone()
        delta[r, jj] = alt[r, jj]
        alt[r, jj] = old
        g[r] += 2 * tt[:, None] * c[jj]
    return delta


@torch.no_grad()
def wqer(theta: torch.Tensor, quantizer: UniformQuantizer, stats: RidgeStatistics, lam: float,
         max_flips: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ERQ Wqer on Θ = [W b] (or W) with a fitted per-output-channel quantizer.

    Returns (integer codes of W [out, in], the compensated Θ whose weight columns are on the grid)."""
    theta = theta.double().clone()
    d = stats.in_features
    s = quantizer.scale.double().reshape(-1, 1)
    z = quantizer.zero_point.double().reshape(-1, 1)
    qmin, qmax = quantizer.qmin, quantizer.qmax
    codes = torch.empty(theta.shape[0], d, dtype=torch.float64, device=theta.device)
    second_moment = stats.gram / max(stats.rows, 1)  # μμᵀ + Σ = E[x̄x̄ᵀ]
    start, k_total = 0, theta.shape[1]
    while start < d:
        # half of what is still float (the code counts the bias column too; it is never quantized)
        k = min(max(1, (k_total - start) // 2), d - start)
        sel, rest = slice(start, start + k), slice(start + k, k_total)
        w = theta[:, sel].clone()  # a copy: theta[:, sel] is overwritten with the grid values below
        lo = torch.clamp(torch.floor(w / s) + z, qmin, qmax)
        hi = torch.clamp(torch.ceil(w / s) + z, qmin, qmax)
        near = torch.clamp(torch.round(w / s) + z, qmin, qmax)
        delta = (near - z) * s - w
        alt = (torch.where(near == lo, hi, lo) - z) * s - w
        delta = refine_rounding(delta, alt, second_moment[sel, sel], max_flips)
        code = torch.clamp(torch.round((w + delta) / s) + z, qmin, qmax)  # exact: w + δ is on the grid
        codes[:, sel] = code
        theta[:, sel] = (code - z) * s
        if start + k < k_total:
            g_rr = stats.gram[rest, rest]
            rhs = stats.gram[rest, sel] @ (theta[:, sel] - w).T
            theta[:, rest] -= torch.linalg.solve(g_rr + _ridge_eye(g_rr.shape[0], lam, g_rr), rhs).T
        start += k
    return codes, theta


class _StopForward(Exception):
    """Raised by a hook once the layer's input is captured: nothing after it needs computing."""


def _layer_input(unit: torch.nn.Module, layer: QuantLinear, inputs: UnitInputs, idx: slice) -> torch.Tensor:
    """What `layer` multiplies its weight with (its input site's output) when `unit` runs on the calls
    `inputs[idx]`; the unit stops there."""
    captured = []

    def hook(_site, _inputs, out):
        captured.append(out)
        raise _StopForward

    handle = layer.input_site.register_forward_hook(hook)
    try:
        run_unit(unit, inputs, idx)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"calibration forward never reached {layer.name!r}")
    return captured[0]


# Images per forward while gathering a layer's statistics: as many as keep the unit's input within 2^20
# floats (4 MiB), at most the engine's 32. The sums then hold the same terms, in batches: every reference
# model (≤ 196 tokens × 48 channels or 17 × 192 per image) still sums all 32 images in one batch, so its
# results are unchanged; DeiT-S (197 × 384) runs 13 images at a time, which cuts the forward's and the
# float64 design matrix's transient memory to ~40%.
STATISTICS_FLOATS = 2**20


def _statistics_batch(inputs: UnitInputs, batch_size: int) -> int:
    return max(1, min(batch_size, STATISTICS_FLOATS // max(1, inputs.x[0].numel())))


class ERQ(RepQViT):
    name = "erq"
    summary = "ERQ (ICML'24): RepQ-ViT + ridge-regression activation error reduction + weight rounding refinement"
    Options = ERQOptions

    @torch.no_grad()
    def calibrate(self, ctx) -> None:
        super().calibrate(ctx)  # RepQ-ViT quantizers and reparameterization
        qmodel, config = ctx.qmodel, ctx.config
        opts = self.options(config)
        rule = RangeRule("mse", candidates=opts.candidates)
        images, batch_size = ctx.images(), 32
        reference = copy.deepcopy(qmodel)  # the float function (reparameterization is exact): ERQ's target
        todo = {n for n, m in qmodel.weight_layers().items()
                if isinstance(m, QuantLinear) and ctx.plan.weight(n) is not None}
        bar = tqdm(total=len(todo), desc="erq", unit="layer", disable=not ctx.progress, leave=False)
        # Unit by unit in forward order, each unit's float input (reference) and quantized input (qmodel)
        # carried from the previous unit's outputs: every layer costs a part of one unit's forward, not
        # two forwards of the whole model.
        f_stream, q_stream = UnitStream(reference, images, batch_size), UnitStream(qmodel, images, batch_size)
        for unit in ctx.structure.units:
            with reference.bypassed():
                f_in = f_stream.inputs(unit.name, unit.chained)
            # the previous unit's outputs, now quantized (parallel mode quantizes the float input instead)
            q_in = q_stream.inputs(unit.name, unit.chained) if opts.sequential else None
            ref_unit, q_unit = reference.submodule(unit.name), qmodel.submodule(unit.name)
            for name in unit.layers:
                if name not in todo:
                    continue
                layer, ref_layer = qmodel.submodule(name), reference.submodule(name)
                with reference.bypassed():
                    stats = self._statistics(q_unit, ref_unit, layer, ref_layer, q_in, f_in,
                                             _statistics_batch(f_in, batch_size), opts.sequential)
                self._reduce_errors(ctx, opts, rule, name, layer, stats)
                bar.update()
            with reference.bypassed():
                f_stream.outputs()  # while the reference is float
            release_memory()  # this unit's activations (see profiling.release_memory)
        bar.close()

    def _reduce_errors(self, ctx, opts: ERQOptions, rule: RangeRule, name: str, layer: QuantLinear,
                       stats: RidgeStatistics) -> None:
        lam = 0.1 * (opts.head_coe if opts.head_coe is not None and layer.input_site.role == "head" else opts.coe)
        theta = layer.weight.detach().double()
        if layer.bias is not None:
            theta = torch.cat([theta, layer.bias.detach().double()[:, None]], dim=1)
        if opts.aqer:
            theta = theta + aqer_delta(stats, theta, lam)
            self._store(layer, theta)
        q = UniformQuantizer(ctx.plan.weight(name), channel_axis=0, name=f"{name}.weight").fit(layer.weight, rule)
        layer.weight_quantizer = q
        if opts.wqer:
            codes, theta = wqer(theta, q, stats, 0.1 * opts.coe, opts.max_flips)
            self._store(layer, theta)
            layer.weight.copy_(q.dequantize(codes.float()))  # bit-exact grid values, as load rebuilds them
            layer.weight_frozen = True
        else:
            layer.freeze_weight()  # round-to-nearest; later layers see this layer quantized

    @staticmethod
    def _store(layer: QuantLinear, theta: torch.Tensor) -> None:
        layer.weight.copy_(theta[:, :layer.in_features].to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(theta[:, layer.in_features].to(layer.bias.dtype))

    @staticmethod
    def _statistics(q_unit, ref_unit, layer, ref_layer, q_in: UnitInputs, f_in: UnitInputs, batch_size: int,
                    sequential: bool) -> RidgeStatistics:
        stats = RidgeStatistics(layer.in_features, layer.out_features, layer.bias is not None, layer.weight.device)
        # under torchrun each rank sums a contiguous range of the batches, then the sums are added up
        for b in distributed.shard(-(-len(f_in) // batch_size)):
            idx = slice(b * batch_size, (b + 1) * batch_size)
            x_float = _layer_input(ref_unit, ref_layer, f_in, idx)  # the reference is bypassed: float
            y = F.linear(x_float, ref_layer.weight, ref_layer.bias)
            # sequential: the input this layer really gets once everything before it is quantized
            x_q = _layer_input(q_unit, layer, q_in, idx) if sequential else layer.input_site(x_float)
            del x_float
            stats.update(x_q, y)
            del x_q, y
            release_memory()  # this batch's activations (see profiling.release_memory)
        stats.gram, stats.cross = distributed.all_reduce(stats.gram), distributed.all_reduce(stats.cross)
        stats.rows = int(distributed.all_reduce(torch.tensor([stats.rows]))[0])
        return stats

