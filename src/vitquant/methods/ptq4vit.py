"""`ptq4vit`: PTQ4ViT, Yuan et al., "PTQ4ViT: Post-Training Quantization for Vision Transformers with
Twin Uniform Quantization", ECCV 2022 (official code: hahnyuan/PTQ4ViT).

Recipe:
1. What is quantized: every Linear (head included), the patch-embedding conv weight (its input, the
   image, stays float), and both inputs of Q·Kᵀ and probs·V. LayerNorm, softmax, GELU stay float.
2. Quantizers: symmetric uniform on the full signed grid [−2^(k−1), 2^(k−1)−1]. Linear weights per
   tensor, except qkv: one scale each for its q, k and v thirds; the conv weight per output channel;
   activations per tensor. Post-softmax (probs) and post-GELU (fc2 input) use twin uniform quantizers
   (see quantizers/twin_uniform.py).
3. Scale search per layer: candidates m·Δ_minmax, m on a linear grid from α = 0.01 to β = 1.2
   (Δ_minmax = absmax/(2^(k−1) − 0.5), as in the code); the twin softmax split over {2^−i, i = 0..19};
   the twin GELU negative step fixed. Weight and input scales (or the two matmul operands) are searched
   alternately for 3 rounds, each layer on the float model's inputs ("parallel" calibration).
4. Metric, "Hessian-guided": minimize mean((∂L/∂O ⊙ (O − Ô))²) at the layer output O (for matmuls: the
   product), L the task loss. See calibration/capture.py for how O and ∂L/∂O are captured.

Deviations from the paper / official code:
- ∂L/∂O: the paper's task loss needs labels; we use L = CE(z, argmax z_FP), the cross-entropy against
  the float model's own prediction. The code uses KL(softmax(z_FP) ‖ softmax(z)) evaluated at the
  float model itself (parallel mode), whose gradient is identically ~0 (issue #23): every candidate
  then ties and the "Hessian" search degenerates. The pseudo-label CE keeps the paper's weighting of
  errors by loss sensitivity at a point where it does not vanish. If a layer's gradient still underflows
  to zero, that layer falls back to plain output MSE (with a warning). `metric="mse"` is plain MSE.
- Candidate count: the paper/code use 101 (eq_n = 100); the default here is smaller to stay fast on a
  CPU (`candidates=101` reproduces the paper grid).
- Matmul operands: one scale per tensor, as the paper states; the code's batching classes use one scale
  per head (`matmul_per_head=True`). The code also leaves V unquantized while it searches the softmax
  split; here V is quantized with its current scale (plain alternation).
- Twin softmax: each value is quantized by the range it falls in (the code sums both clamped ranges,
  see quantizers/twin_uniform.py).
- The image input of the patch embedding stays float whatever `QuantConfig.patch_embed_input_bits` says
  (the site is recorded as disabled); `quantize_image=True` quantizes it at those bits, searched too.
- Rows evaluated (`search_macs`): a candidate's error is measured on a seeded sample of each Linear's
  input rows (tokens), as many as make one evaluation cost `search_macs` = 2^27 multiply-adds, at least
  256 (DeiT-S: 256-910 of 6,304 tokens at 32 images), and each attention core's on the operands of as
  many images (DeiT-S: 8 of 32); the candidate grids still come from the extremes of every row and
  image. The reference models (≤ 192 × 768 layers, 544 tokens) are evaluated whole, so their results
  are unchanged. `search_macs=0` evaluates every row, as the code does (~250 evaluations per layer:
  hundreds of forward passes on DeiT-S). Measured effect: benchmarks/results/calibration_cost.md.
- Rounds stop early at a fixed point (a round that returns the scales it started from would be repeated
  identically), which changes nothing.
- The code's bias-correction flag is a no-op there (the call is commented out); not implemented.
- `twin=False` is the paper's ablation (the code's `no_softmax`/`no_postgelu`): plain symmetric grids
  there. `QuantConfig(deployable=True)` implies it, since twin grids have no exact ONNX QDQ form.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vitquant.methods.base import Method
from vitquant.calibration.capture import CoreCapture, LayerCapture
from vitquant.methods.grid_search import SEARCH_MACS, grid_argmin, search_rows
from vitquant.methods.steps import capture_by_units
from vitquant.models.qmodules import QuantConv2d, QuantLinear
from vitquant.quantizers import UniformQuantizer
from vitquant.quantizers.twin_uniform import (SPLIT_EXPONENTS, TwinUniformGeluQuantizer, TwinUniformSoftmaxQuantizer,
                                              gelu_twin_fake_quant, softmax_twin_fake_quant)

_EPS = 1e-8


@dataclass
class PTQ4ViTOptions:
    metric: str = "hessian"  # "hessian": (∂L/∂O)²-weighted output error; "mse": plain output MSE
    candidates: int = 41  # scale candidates per search (the paper: 101)
    alpha: float = 0.01  # the candidate grid spans [alpha, beta] × the min-max step
    beta: float = 1.2
    rounds: int = 3  # weight/activation alternations
    batch_size: int = 4  # images per forward/backward pass while capturing (memory only)
    matmul_per_head: bool = False  # one scale per head for q, k, v (the official code's batching classes)
    quantize_image: bool = False  # quantize the patch-embedding input at config.patch_embed_input_bits
    twin: bool = True  # False: plain symmetric grids for softmax/GELU outputs (the paper's ablation)
    search_macs: int = SEARCH_MACS  # multiply-adds per candidate evaluation (row/image sample); 0: all

    def __post_init__(self) -> None:
        if self.metric not in ("hessian", "mse"):
            raise ValueError(f"metric must be 'hessian' or 'mse', not {self.metric!r}")
        if self.candidates < 2 or self.rounds < 1 or self.batch_size < 1:
            raise ValueError("candidates must be >= 2, rounds and batch_size >= 1")
        if not 0 < self.alpha < self.beta:
            raise ValueError(f"need 0 < alpha < beta, got alpha={self.alpha}, beta={self.beta}")
        if not isinstance(self.search_macs, int) or self.search_macs < 0:
            raise ValueError(f"search_macs must be an integer >= 0 (0: every row), got {self.search_macs!r}")


def symmetric_fake_quant(x: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """PTQ4ViT's uniform quantizer: clamp(round(x/Δ), −2^(k−1), 2^(k−1)−1)·Δ."""
    half = 2 ** (bits - 1)
    return (x / scale).round_().clamp_(-half, half - 1).mul_(scale)


def full_range_symmetric(bits: int, scale: torch.Tensor, channel_axis: int | None, name: str) -> UniformQuantizer:
    """`symmetric_fake_quant` as a saveable UniformQuantizer: the asymmetric form with zero point 2^(k−1)
    (the library's symmetric form drops the code −2^(k−1))."""
    q = UniformQuantizer(bits, symmetric=False, channel_axis=channel_axis, name=name)
    scale = scale.detach().float().reshape(-1) if channel_axis is not None else scale.detach().float().reshape(())
    q.set_params(scale.clamp_min(_EPS), torch.full_like(scale, 2.0 ** (bits - 1)))
    return q


def _minmax_step(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    return (absmax / (2 ** (bits - 1) - 0.5)).clamp_min(_EPS)


class PTQ4ViT(Method):
    name = "ptq4vit"
    summary = "PTQ4ViT (ECCV'22): twin uniform softmax/GELU quantizers, Hessian-guided scale search"
    Options = PTQ4ViTOptions

    def calibrate(self, ctx) -> None:
        qmodel, config = ctx.qmodel, ctx.config
        self.opts = opts = self.options(config)
        self.plan = ctx.plan
        self.quantize_image = opts.quantize_image
        # twin uniform grids have no exact ONNX QDQ form: QuantConfig(deployable=True) searches plain ones
        self.twin = opts.twin and not ctx.plan.deployable
        self.mults = torch.linspace(opts.alpha, opts.beta, opts.candidates, device=ctx.device)
        self.qkv = dict(ctx.structure.fused_qkv)  # layer → number of q/k/v parts: one scale each
        units = ctx.structure.units
        rows = lambda l: (search_rows(l.in_features, l.out_features, opts.search_macs)  # noqa: E731
                          if isinstance(l, QuantLinear) else None)
        captures = capture_by_units(qmodel, units, ctx.images(), opts.batch_size, opts.metric == "hessian", rows,
                                    opts.search_macs or None, seed=config.seed)
        for unit, layer_caps, core_caps in tqdm(captures, total=len(units), desc="ptq4vit", unit="unit",
                                                disable=not ctx.progress, leave=False):
            for name in unit.layers:
                layer, cap = qmodel.submodule(name), layer_caps.pop(name)
                if isinstance(layer, QuantConv2d):
                    self._calibrate_conv(layer, cap)
                else:
                    self._calibrate_linear(layer, cap)
            for core in unit.cores:
                core = ctx.structure.core(core)
                self._calibrate_attention(qmodel.core_sites(core), core.name, core_caps.pop(core.name))

    # -- metric -------------------------------------------------------------------------------------
    def _weights(self, grad: torch.Tensor | None, what: str) -> torch.Tensor | None:
        """(∂L/∂O) rescaled to unit RMS (a constant factor does not move the argmin, and keeps squares
        away from float32 underflow); None for plain MSE."""
        if self.opts.metric == "mse":
            return None
        rms = grad.double().pow(2).mean().sqrt()
        if not torch.isfinite(rms) or rms == 0:
            warnings.warn(f"ptq4vit: the task-loss gradient at {what} is zero; its scales are searched by output MSE",
                          stacklevel=3)
            return None
        return (grad.double() / rms).float()

    @staticmethod
    def _sq_err(ref: torch.Tensor, out: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """(weight ⊙ (out − ref))², computed in place in `out` (a fresh, larger, broadcast tensor)."""
        out.sub_(ref)
        if weight is not None:
            out.mul_(weight)
        return out.square_()

    # -- Linear -------------------------------------------------------------------------------------
    def _calibrate_linear(self, layer: QuantLinear, cap: LayerCapture) -> None:
        site, opts = layer.input_site, self.opts
        wb, ab = self.plan.weight(layer.name), self.plan.act(site.name)  # None: kept float by the plan
        x = cap.x.reshape(-1, layer.in_features)
        W, out = layer.weight.detach(), layer.out_features
        bias = layer.bias.detach() if layer.bias is not None else torch.zeros(out, device=W.device)
        ref = F.linear(x, W, bias)
        gw = self._weights(cap.grad, layer.name)
        gw = gw.reshape(-1, out) if gw is not None else None
        groups = self.qkv.get(layer.name, 1) if out % self.qkv.get(layer.name, 1) == 0 else 1  # q, k, v: a scale each
        Wg = W.reshape(groups, out // groups, -1)
        twin = self.twin and site.role == "post_gelu"
        # the grid comes from the extremes of every row, also when the error is measured on a sample
        lo, hi = (cap.lo.min(), cap.hi.max()) if cap.lo is not None else (x.min(), x.max())
        if ab is None:
            fq_act, a_base = (lambda t, s: t), None  # noqa: E731
        elif twin:  # the positive range is searched; the negative one is fixed (GELU's minimum)
            fq_act = lambda t, s: gelu_twin_fake_quant(t, s, ab)  # noqa: E731
            a_base = _minmax_step(hi.clamp_min(0), ab)
        else:
            fq_act = lambda t, s: symmetric_fake_quant(t, s, ab)  # noqa: E731
            a_base = _minmax_step(torch.maximum(lo.abs(), hi.abs()), ab)
        s_a = a_base  # the first weight search sees min-max inputs, as in the code
        rows, per = x.shape[0], out // groups
        s_w, wq = None, W

        for _ in range(opts.rounds):
            s_a_before = s_a
            xq = fq_act(x, s_a)
            if wb is not None:
                w_cands = self.mults[:, None] * _minmax_step(Wg.abs().amax(dim=(1, 2)), wb)[None]  # [K, groups]

                def w_err(c, items):
                    k = c.shape[0]
                    wq = symmetric_fake_quant(Wg[None], c[:, :, None, None], wb).reshape(k * out, -1)
                    o = F.linear(xq[items], wq, bias.repeat(k)).reshape(-1, k, groups, per)
                    e = self._sq_err(ref[items].reshape(-1, 1, groups, per), o,
                                     gw[items].reshape(-1, 1, groups, per) if gw is not None else None)
                    return e.sum(dim=(0, 3))

                s_w = grid_argmin(w_cands, rows, out + x.shape[1], w_err)
                wq = symmetric_fake_quant(Wg, s_w[:, None, None], wb).reshape(out, -1)
            if ab is None:
                break

            def a_err(c, items):
                o = F.linear(fq_act(x[items][None], c.reshape(-1, 1, 1)), wq, bias)
                return self._sq_err(ref[items][None], o, gw[items][None] if gw is not None else None).sum(dim=(1, 2))[:, None]

            s_a = grid_argmin((self.mults * a_base)[:, None], rows, out + x.shape[1], a_err)[0]
            if torch.equal(s_a, s_a_before):  # a fixed point: every further round would repeat this one
                break

        if s_w is not None:
            per_channel = s_w.repeat_interleave(per)
            layer.weight_quantizer = full_range_symmetric(wb, per_channel if groups > 1 else s_w[0],
                                                          0 if groups > 1 else None, f"{layer.name}.weight")
        if ab is None:
            site.quantizer, site.enabled = None, False
        elif twin:
            site.quantizer = TwinUniformGeluQuantizer(ab, name=site.name)
            site.quantizer.set_pos_scale(s_a)
            site.enabled = True
        else:
            site.quantizer, site.enabled = full_range_symmetric(ab, s_a, None, site.name), True

    # -- patch-embedding conv -----------------------------------------------------------------------
    def _calibrate_conv(self, conv: QuantConv2d, cap: LayerCapture) -> None:
        site = conv.input_site
        wb = self.plan.weight(conv.name)
        # PTQ4ViT keeps the image in float (the code builds the conv with a_bit=32); other convs' inputs
        # (hybrid stems, depthwise convs) are quantized like every matmul input
        ib = self.plan.act(site.name) if (site.role != "image" or self.quantize_image) else None
        x, W = cap.x, conv.weight.detach()
        out, g = W.shape[0], conv.groups
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(out, device=W.device)
        conv_fn = lambda t, w, b: F.conv2d(t, w, b, conv.stride, conv.padding, conv.dilation, g)  # noqa: E731
        ref = conv_fn(x, W, bias)
        gw = self._weights(cap.grad, conv.name)
        x_base = _minmax_step(x.abs().max(), ib) if ib else None
        s_x, s_w, wq = x_base, None, W
        per_image = ref[0].numel()
        for _ in range(self.opts.rounds if ib else 1):  # a float input leaves nothing to alternate with
            s_x_before = s_x
            xq = symmetric_fake_quant(x, s_x, ib) if ib else x
            if wb is not None:
                w_cands = self.mults[:, None] * _minmax_step(W.abs().amax(dim=(1, 2, 3)), wb)[None]  # per channel

                def w_err(c, items):
                    k = c.shape[0]
                    wq = symmetric_fake_quant(W[None], c[:, :, None, None, None], wb)
                    if g == 1:  # all candidates in one conv: [k·out] output channels
                        o = conv_fn(xq[items], wq.reshape(k * out, *W.shape[1:]), bias.repeat(k))
                        o = o.reshape(-1, k, *ref.shape[1:])
                    else:  # grouped: one conv per candidate keeps each group on its own inputs
                        o = torch.stack([conv_fn(xq[items], wq[i], bias) for i in range(k)], dim=1)
                    e = self._sq_err(ref[items][:, None], o, gw[items][:, None] if gw is not None else None)
                    return e.sum(dim=(0, 3, 4))

                s_w = grid_argmin(w_cands, x.shape[0], per_image + x[0].numel(), w_err)
                wq = symmetric_fake_quant(W, s_w[:, None, None, None], wb)
            if ib:

                def x_err(c, items):
                    k = c.shape[0]
                    xk = symmetric_fake_quant(x[items][None], c.reshape(k, 1, 1, 1, 1), ib).flatten(0, 1)
                    o = conv_fn(xk, wq, bias).reshape(k, -1, *ref.shape[1:])
                    e = self._sq_err(ref[items][None], o, gw[items][None] if gw is not None else None)
                    return e.sum(dim=(1, 2, 3, 4))[:, None]

                s_x = grid_argmin((self.mults * x_base)[:, None], x.shape[0], per_image + x[0].numel(), x_err)[0]
                if torch.equal(s_x, s_x_before):  # a fixed point (see _calibrate_linear)
                    break
        if s_w is not None:
            conv.weight_quantizer = full_range_symmetric(wb, s_w, 0, f"{conv.name}.weight")
        if ib:
            site.quantizer, site.enabled = full_range_symmetric(ib, s_x, None, site.name), True
        else:
            site.quantizer, site.enabled = None, False

    # -- attention matmuls --------------------------------------------------------------------------
    def _calibrate_attention(self, sites: dict, name: str, cap: CoreCapture) -> None:
        bits = {k: self.plan.act(site.name) for k, site in sites.items()}
        heads = cap.q.shape[1] if cap.q.dim() == 4 else 1
        per_head = heads if self.opts.matmul_per_head else 1

        def uniform(key):
            b = bits[key]
            return (lambda t, s: t) if b is None else (lambda t, s: symmetric_fake_quant(t, s, b))

        operand = {"q": "q", "k": "kt", "v": "v", "softmax": "probs"}

        def step(t, key):  # min-max step per tensor, or per head (of every image, when t holds a subset)
            if cap.extremes is not None and operand[key] in cap.extremes:
                lo, hi = cap.extremes[operand[key]]
                absmax = torch.maximum(lo.abs(), hi.abs())
                return _minmax_step(absmax if per_head > 1 else absmax.max().reshape(-1), bits[key] or 8)
            dims = (0, 2, 3) if per_head > 1 else tuple(range(t.dim()))
            return _minmax_step(t.abs().amax(dim=dims).reshape(-1), bits[key] or 8)

        # Q·Kᵀ: O1 = q kᵀ (the 1/√d scale comes after the product, so it only rescales the metric)
        q_cands = self.mults[:, None] * step(cap.q, "q")[None]
        k_cands = self.mults[:, None] * step(cap.kt, "k")[None]
        s_q, s_k = self._search_matmul(cap.q, cap.kt, cap.grad_scores, uniform("q"), q_cands,
                                       uniform("k"), k_cands, f"{name} q·kᵀ")
        # probs·V: twin uniform probs (split searched over {2^-i}, initial split 0.01 as in the code), uniform V
        v_cands = self.mults[:, None] * step(cap.v, "v")[None]
        twin = self.twin and bits["softmax"] is not None
        if twin:
            fq_p = lambda t, s: softmax_twin_fake_quant(t, s, bits["softmax"])  # noqa: E731
            device = cap.probs.device
            splits = torch.tensor([2.0**-i for i in range(SPLIT_EXPONENTS)], device=device)[:, None]
            s_p, s_v = self._search_matmul(cap.probs, cap.v, cap.grad_context, fq_p, splits, uniform("v"), v_cands,
                                           f"{name} probs·v", a_init=torch.tensor([0.01], device=device))
        else:
            p_cands = self.mults[:, None] * step(cap.probs, "softmax")[None]
            s_p, s_v = self._search_matmul(cap.probs, cap.v, cap.grad_context, uniform("softmax"), p_cands,
                                           uniform("v"), v_cands, f"{name} probs·v")
        axis = 1 if per_head > 1 else None  # the sites see [B, H, N, ·]
        for key, s in (("q", s_q), ("k", s_k), ("v", s_v)) + (() if twin else (("softmax", s_p),)):
            site = sites[key]
            if bits[key] is None:
                site.quantizer, site.enabled = None, False
            else:
                site.quantizer = full_range_symmetric(bits[key], s if axis else s[0], axis, site.name)
                site.enabled = True
        if twin:
            site = sites["softmax"]
            site.quantizer = TwinUniformSoftmaxQuantizer(bits["softmax"], name=site.name)
            site.quantizer.set_split(float(s_p[0]))
            site.enabled = True

    def _search_matmul(self, a, b, grad, fq_a, a_cands, fq_b, b_cands, what, a_init=None):
        """Alternate the scales of the two operands of O = a @ b ([B, H, ·, ·]); candidates are
        [K, G] with G = 1 (per tensor) or H (per head, heads being independent)."""
        ref = a @ b
        gw = self._weights(grad, what)
        s_a = a_cands[-1] / self.opts.beta if a_init is None else a_init
        s_b = b_cands[-1] / self.opts.beta
        per_image = ref[0].numel() + a[0].numel() + b[0].numel()

        def err(which):
            def fn(c, items):
                k, G = c.shape
                shape = (k, 1, G, 1, 1)
                if which == "a":
                    o = fq_a(a[items][None], c.reshape(shape)) @ bq[items]
                else:
                    o = aq[items] @ fq_b(b[items][None], c.reshape(shape))
                e = self._sq_err(ref[items][None], o, gw[items][None] if gw is not None else None)
                e = e.sum(dim=(1, 3, 4))  # [k, H]
                return e if G > 1 else e.sum(dim=1, keepdim=True)
            return fn

        def quant(fq, t, s):
            return fq(t, s.reshape(-1, 1, 1) if s.numel() > 1 else s.reshape(()))

        for _ in range(self.opts.rounds):
            s_b_before = s_b
            bq = quant(fq_b, b, s_b)
            s_a = grid_argmin(a_cands, a.shape[0], per_image, err("a"))
            aq = quant(fq_a, a, s_a)
            s_b = grid_argmin(b_cands, a.shape[0], per_image, err("b"))
            if s_b.shape == s_b_before.shape and torch.equal(s_b, s_b_before):  # a fixed point: rounds would repeat
                break
        return s_a, s_b
