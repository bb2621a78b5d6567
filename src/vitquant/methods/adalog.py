"""`adalog`: AdaLog, Wu, Chen, Zhong, Huang and Wang, "AdaLog: Post-Training Quantization for Vision
Transformers with Adaptive Logarithm Quantizer", ECCV 2024 (code: GoatWu/AdaLog).

Recipe (calibration only; parallel: every layer's inputs and outputs come from the float model):
1. Post-softmax (first input of softmax·V): the AdaLog quantizer (quantizers/adalog.py), s = 1, its
   log base 2^(q/37) searched over the integers q ∈ q_range by the error of softmax·V.
2. Post-GELU (fc2 input): AdaLog on x + 0.16997; q and s found by FPCS's combining search by fc2's
   output error; the shift is then folded into fc2's bias (reparam.fold_input_shift).
3. q, k and v: asymmetric uniform with one (s, z) per head, by FPCS on the error of Q·Kᵀ / softmax·V.
4. Post-LayerNorm inputs (qkv, fc1): channel-wise (s, z) by FPCS on the input error, then RepQ-ViT's
   reparameterization to one layer-wise grid (repq_vit.reparameterize_post_ln), then searched again.
5. Every other Linear/conv input layer-wise (patch embedding at `patch_embed_input_bits`), weights
   per output channel, asymmetric; each layer: weight and input ranges first by their own error, then
   `rounds` rounds alternating FPCS on the layer's output error (methods/fpcs.py); the attention
   operands alternate as many rounds.
6. Optional block reconstruction (`reconstruct=True`, the paper's "--optimize"): the shared step of
   methods/reconstruction.py, run before the bias fold.

Options and their CPU-friendly defaults (the paper/code value in brackets): candidates 32 [128],
top_k 4 [16; 32 in the post-GELU combining stage], steps 4 [6], rounds 2 [3] (1 on real-size models,
see below), q_range (1, 138)
[(10, 138)]. Pass {"candidates": 128, "top_k": 16, "steps": 6, "rounds": 3, "q_range": (10, 138)} for
the official search. `reparam_head` (default "auto"; not in the paper or code) also reparameterizes the
final norm → head input, as RepQ-ViT's option of that name — "auto" only where that input's channel
ranges spread > 10× (see repq_vit.head_outliers); false is the published recipe.

Deviations from the paper / official code:
- The dequantization table is exact (2^(−j/37)); `table="rounded"` gives the code's table rounded to
  1/(2^(b+1) − 2) steps (see quantizers/adalog.py).
- FPCS: zero-point candidates around each range's own zero point, best candidate kept (see fpcs.py).
- Post-LN inputs are reparameterized at every bit width (the code only when a_bits == w_bits), and the
  exact grid the reparameterization produces joins the candidates of the layer-wise search, so that
  search can only improve on the channel-wise quantization under the output metric.
- q is searched from 1, not 10: the code's smallest base 2^(10/37) ≈ 1.21 bounds the relative step
  at ~20%, which caps the error of 6–8-bit post-GELU inputs (on a tiny ViT, W8A8 output SQNR 21 dB
  with q ≥ 10 against 37 dB with q ≥ 1; cf. AdaLog issue #2, W8A8 collapse).
- The post-GELU combining stage keeps top_k bases (the code: 8) and top_k combinations (the code: 32).
- Rows evaluated: a layer input (a Linear's tokens, a conv's patches) of at most `whole_rows` = 2048
  rows is searched whole (bundled and 12-block models: 544 rows; Swin stage 2: 1,568); a larger one
  keeps at most `max_rows` = 4096 rows (Swin stage 1: 4,096 of 6,272), and fewer where one candidate
  evaluation would cost more than `search_macs` = 2^26 multiply-adds (at least `min_rows` = 128;
  DeiT-S at 32 images: 128-455 of 6,304 tokens). The attention searches use the operands of as many
  images as make one Q·Kᵀ evaluation cost at most `core_macs` = 2^25 (reference models: all 32; DeiT-S:
  2 of 32; it was 2^26, 4 images, for no measurable gain: DeiT-S logit SQNR 7.48 dB at 4 images, 7.56
  at 2). Samples are seeded; candidate ranges still come from the extremes of every row and image.
  The row budget was 5·2^24 (DeiT-S: 142-569 rows; the reference models sampled as now) until issue
  16's cost budget asked for less: measured on random-init DeiT-S W4A4 (1 thread), 176.7 → 148.3 CPU-s,
  logit SQNR vs float 6.84 → 6.53 dB. Cost: benchmarks/results/calibration_cost.md.
- `schedule="auto"` (default): on a real-size model (a unit output of ≥ 2^15 floats per image, DeiT-T
  and larger) calibrated on a CPU (a GPU keeps 2) one weight/input alternation round instead of 2, since a round there re-fits the same row
  sample: random-init DeiT-S W4A4 at 2 threads 154 → 84 CPU-s, logit SQNR 7.48 → 7.26 dB (seed 1:
  7.67 → 7.59); fewer rows for the same saving cost more (see ROUNDS). The reference models keep 2
  rounds (unchanged results); `schedule="reference"`/`"cpu"` or an explicit `rounds` override it.
- The official loader applies timm's *training* transform to the calibration images; vitquant uses
  the model's evaluation preprocessing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vitquant.errors import VitquantError
from vitquant.methods.base import Method
from vitquant.methods.fpcs import FPCS, evaluate, uniform_fake
from vitquant.methods.grid_search import search_rows
from vitquant.methods.reparam import fold_input_shift
from vitquant.methods.repq_vit import HeadChoice, ReparamChoice, head_outliers, reparameterize_post_ln
from vitquant.methods.steps import capture_by_units, largest_unit_output, schedule_name
from vitquant.models import roles
from vitquant.models.qmodules import QuantConv2d, QuantLinear
from vitquant.quantizers import AdaLogQuantizer, UniformQuantizer
from vitquant.quantizers.adalog import GELU_SHIFT, R_DEFAULT, TABLES, adalog_codes, adalog_dequantize, mantissa_table


# AdaLog evaluates ~130 FPCS candidates per search and 138 log bases per attention map, several
# searches per layer: its samples are smaller than the other searches' (grid_search.SEARCH_MACS). A
# layer with at most ADALOG_WHOLE_ROWS input rows is evaluated whole: every reference model's layers
# (bundled/12-block: 544 rows; Swin stage 2: 1,568 rows ≤ 58 M multiply-adds), as before. Larger inputs
# keep as many rows as make one candidate evaluation cost 2^26 multiply-adds (DeiT-S at 32 images: 128-455
# of 6,304 rows; it was 5·2^24, 142-569 rows: measured on random-init DeiT-S W4A4, 1 thread, 176.7 →
# 148.3 CPU-s, logit SQNR vs float 6.84 → 6.53 dB). Attention: 2^25 keep all 32 images of the reference
# models' attention maps (Swin stage 1: 14.7 M); DeiT-S 2 of 32 images (2^26, 4 images, until issue 16).
ADALOG_SEARCH_MACS = 2**26
ADALOG_WHOLE_ROWS = 2048
ADALOG_CORE_MACS = 2**25
# Weight/input alternation rounds per layer: "reference" (the reference models; the code: 3) and "cpu",
# which schedule="auto" picks on real-size models (steps.REAL_SIZE_FLOATS). Measured on random-init
# DeiT-S W4A4, 32 images, 2 threads (calibration CPU-s, logit SQNR vs float, seeds 0/1): 2 rounds
# 154/159 CPU-s, 7.48/7.67 dB; 1 round (with the attention sample at 2 images) 84/78, 7.26/7.59 dB; the
# alternative of fewer rows instead (96 per Linear, 2 rounds) 111 CPU-s (seed 0), 6.95/6.39 dB.
ROUNDS = {"reference": 2, "cpu": 1}


@dataclass
class AdaLogOptions:
    candidates: int = 32
    top_k: int = 4
    steps: int = 4
    rounds: int | None = None  # weight/input alternations per layer; None: from `schedule`
    schedule: Literal["auto", "reference", "cpu"] = "auto"  # see ROUNDS
    q_range: tuple[int, int] = (1, 138)  # log-base candidates q, base 2^(q/r), inclusive (code: 10..138)
    r: int = R_DEFAULT
    table: str = "exact"
    post_gelu: str = "adalog"  # or "uniform" (the ablation)
    reparam_post_ln: bool = True
    reparam_head: HeadChoice = "auto"  # also the final norm → head input (not in the paper or code)
    fold_shift: bool = True
    max_rows: int = 4096  # rows (tokens) of a layer's input used by the search, at most
    search_macs: int = ADALOG_SEARCH_MACS  # fewer rows where one candidate evaluation would cost more; 0: off
    min_rows: int = 128  # rows a Linear's search keeps at least
    whole_rows: int = ADALOG_WHOLE_ROWS  # a Linear input with at most this many rows is searched whole
    core_macs: int = ADALOG_CORE_MACS  # fewer images where one Q·Kᵀ evaluation would cost more; 0: all images
    reconstruct: bool = False
    reconstruct_iters: int = 200

    def __post_init__(self) -> None:
        self.q_range = tuple(int(q) for q in self.q_range)
        FPCS(self.candidates, self.top_k, self.steps)  # validates
        if len(self.q_range) != 2 or not 1 <= self.q_range[0] <= self.q_range[1]:
            raise ValueError(f"q_range must be (lo, hi) with 1 ≤ lo ≤ hi, got {self.q_range}")
        if self.table not in TABLES:
            raise ValueError(f"table must be one of {TABLES}, got {self.table!r}")
        if self.post_gelu not in ("adalog", "uniform"):
            raise ValueError(f"post_gelu must be 'adalog' or 'uniform', got {self.post_gelu!r}")
        if (self.rounds is not None and self.rounds < 1) or self.max_rows < 1 or self.r < 1:
            raise ValueError("rounds, max_rows and r must be positive")
        if self.schedule not in ROUNDS and self.schedule != "auto":
            raise ValueError(f"schedule must be 'auto', 'reference' or 'cpu', got {self.schedule!r}")
        for name in ("search_macs", "core_macs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0: no limit), got {value!r}")
        if not isinstance(self.min_rows, int) or self.min_rows < 1:
            raise ValueError(f"min_rows must be a positive integer, got {self.min_rows!r}")


def reconstruction_step():
    """The shared block-reconstruction step, or a clear error while it does not exist."""
    try:
        from vitquant.methods.reconstruction import ReconstructionOptions, reconstruct_blocks
    except ImportError:
        raise VitquantError(
            "reconstruct=True needs the shared block-reconstruction step (vitquant.methods.reconstruction), "
            "which is not available yet in this vitquant; calibrate without it (reconstruct=False)"
        ) from None
    return reconstruct_blocks, ReconstructionOptions


def _minmax(rows: torch.Tensor, bits: int, extremes=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column min-max (s, z): the starting point before a search (extremes: the exact (min, max)
    when rows are a sample)."""
    q = UniformQuantizer(bits)
    return q.params_for_range(*((rows.amin(0), rows.amax(0)) if extremes is None else extremes))


def _uniform(bits: int, s: torch.Tensor, z: torch.Tensor, name: str, channel_axis: int | None = None) -> UniformQuantizer:
    q = UniformQuantizer(bits, channel_axis=channel_axis, name=name)
    shape = (-1,) if channel_axis is not None else ()
    q.set_params(s.reshape(shape), z.reshape(shape))
    return q


class AdaLog(Method):
    name = "adalog"
    summary = "AdaLog (ECCV'24): adaptive-base log quantizer for post-softmax/post-GELU, FPCS search"
    Options = AdaLogOptions

    def calibrate(self, ctx) -> None:
        qmodel, config = ctx.qmodel, ctx.config
        opts = self.options(config)
        if opts.reconstruct:
            reconstruct_blocks, ReconstructionOptions = reconstruction_step()  # fail before any work
        self.opts, self.config, self.plan = opts, config, ctx.plan
        self.search = FPCS(opts.candidates, opts.top_k, opts.steps)
        self.table = mantissa_table(opts.r, config.a_bits, opts.table)
        self.gen = torch.Generator().manual_seed(config.seed)
        units = ctx.structure.units
        self.rounds = opts.rounds or ROUNDS[schedule_name(
            opts.schedule, largest_unit_output(qmodel, units, ctx.images()) if opts.schedule == "auto" else 0,
            ctx.device)]
        reparam = ReparamChoice(ctx, opts.reparam_head)  # head mappings decided below, from the captured ranges
        first = {m.layers[0]: m for m in (reparam.post_ln if opts.reparam_post_ln else []) + reparam.heads}
        captures = capture_by_units(qmodel, units, ctx.images(), 32, False, self._capture_rows,
                                    opts.core_macs or None, seed=config.seed)
        with torch.no_grad():
            for unit, caps, core_caps in tqdm(captures, total=len(units), desc="adalog search",
                                              disable=not ctx.progress, leave=False):
                layers = [qmodel.submodule(n) for n in unit.layers]
                rows = {l.name: self._rows(l, caps.pop(l.name)) for l in layers}  # name → (rows, extremes)
                for layer in layers:
                    if layer.name in first:  # channel-wise first, then one shared layer-wise grid
                        mapping = first[layer.name]
                        x, ext = rows[layer.name]
                        if any(mapping is h for h in reparam.heads) and not head_outliers(
                                opts.reparam_head, *(ext or (x.amin(0), x.amax(0)))):
                            continue
                        r, b = self._channel_wise_then_reparam(qmodel, mapping, *rows[layer.name])
                        for name in mapping.layers:
                            x, ext = rows[name]
                            rows[name] = (x / r - b, None if ext is None else (ext[0] / r - b, ext[1] / r - b))
                for layer in layers:
                    self._search_layer(layer, *rows[layer.name])
                for name in unit.cores:
                    cap, sites = core_caps.pop(name), qmodel.core_sites(ctx.structure.core(name))
                    ext = cap.extremes or {}
                    self._search_qk(sites, cap.q, cap.kt, ext.get("q"), ext.get("kt"))
                    self._search_softmax_v(sites, cap.probs, cap.v, ext.get("v"))
        if opts.reconstruct:
            reconstruct_blocks(qmodel, ctx.calib, ReconstructionOptions(iters=opts.reconstruct_iters), ctx.progress)
        if opts.fold_shift:  # after reconstruction, which may still change fc2's weights
            self._fold_post_gelu_shifts(qmodel)

    # -- bookkeeping --------------------------------------------------------------------------------
    def _keep(self, in_features: int, out_features: int) -> int:
        """Rows a layer's search evaluates: max_rows, fewer where an evaluation would cost > search_macs."""
        by_cost = search_rows(in_features, out_features, self.opts.search_macs, self.opts.min_rows)
        return self.opts.max_rows if by_cost is None else min(self.opts.max_rows, by_cost)

    def _capture_rows(self, layer):
        """Linear inputs are sampled while captured (the capture keeps their exact extremes) unless they
        have at most whole_rows rows; conv inputs whole, their unfolded patches are sampled in `_rows`."""
        if not isinstance(layer, QuantLinear):
            return None
        keep = self._keep(layer.in_features, layer.out_features)
        return lambda total: total if total <= self.opts.whole_rows else keep

    def _rows(self, layer, cap) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The layer's input as [rows, in] (a seeded sample), and the exact per-column (min, max) of all
        rows when the rows are a sample (None: they are all)."""
        x = cap.x
        if isinstance(layer, QuantConv2d):  # a conv is a Linear on unfolded patches
            if layer.groups != 1:  # grouped/depthwise: no single matmul; rows are the input's channels
                x = x.movedim(1, -1)
            else:
                kernel = layer.weight.shape[2:]
                x = F.unfold(x, kernel, layer.dilation, layer.padding, layer.stride).transpose(1, 2)
        rows = x.reshape(-1, x.shape[-1]).float()
        if cap.lo is not None:
            return rows, (cap.lo.float(), cap.hi.float())
        keep = self.opts.max_rows if isinstance(layer, QuantLinear) or layer.groups != 1 else self._keep(
            rows.shape[1], layer.weight.shape[0])
        if rows.shape[0] > max(keep, self.opts.whole_rows):
            extremes = (rows.amin(dim=0), rows.amax(dim=0))
            return rows[torch.randperm(rows.shape[0], generator=self.gen)[:keep].sort().values], extremes
        return rows, None

    def _bits(self, site) -> int | None:
        return self.plan.act(site.name)

    # -- linear layers ------------------------------------------------------------------------------
    def _channel_wise_then_reparam(self, qmodel, mapping, x: torch.Tensor, extremes=None):
        site = qmodel.submodule(mapping.layers[0]).input_site
        bits = self._bits(site)

        def input_error(s, z):  # per channel
            return uniform_fake(x[None], s[:, None], z[:, None], bits).sub_(x).square_().mean(1)

        s, z = self.search.search_uniform(input_error, x, bits, x.numel(), extremes=extremes)
        site.quantizer = _uniform(bits, s, z, site.name, channel_axis=site.channel_axis)
        return reparameterize_post_ln(qmodel, mapping, "mean")

    def _search_layer(self, layer, x: torch.Tensor, extremes=None) -> None:
        site = layer.input_site
        # per-tensor extremes of every row (the rows may be a sample)
        tensor_ext = None if extremes is None else (extremes[0].min().reshape(1), extremes[1].max().reshape(1))
        x_max = x.max() if extremes is None else tensor_ext[1][0]
        w_bits = self.plan.weight(layer.name) or self.config.w_bits  # a float weight: dropped by apply_plan
        a_bits = self._bits(site)
        if isinstance(layer, QuantConv2d) and layer.groups != 1:
            return self._search_grouped(layer, x, w_bits, a_bits)
        W = layer.weight.detach().reshape(layer.weight.shape[0], -1).float()
        bias = None if layer.bias is None else layer.bias.detach().float()
        y = F.linear(x, W, bias)
        n, (c_out, c_in) = x.shape[0], W.shape
        # the GELU shift folds into a Linear's bias exactly; into a padded conv it would not (border taps)
        adalog = site.role == "post_gelu" and self.opts.post_gelu == "adalog" and isinstance(layer, QuantLinear)
        extra = None  # the exact grid of a reparameterized post-LN input joins the candidates
        if isinstance(site.quantizer, UniformQuantizer) and site.quantizer.channel_axis is None:
            extra = (site.quantizer.scale, site.quantizer.zero_point)

        def w_self(s, z):
            return uniform_fake(W[None], s[..., None], z[..., None], w_bits).sub_(W).square_().mean(-1)

        ws, wz = self.search.search_uniform(w_self, W.t(), w_bits, W.numel())
        if a_bits is None:
            act = None
        elif adalog:
            act = AdaLogQuantizer(a_bits, self.opts.r, self.opts.r, GELU_SHIFT, table=self.opts.table, name=site.name)
            act.set_params(x_max + GELU_SHIFT)
        else:
            rows = x.reshape(-1, 1)

            def a_self(s, z):
                return uniform_fake(x[None], s[..., None], z[..., None], a_bits).sub_(x).square_().mean((1, 2))[:, None]

            act = _uniform(a_bits, *self.search.search_uniform(a_self, rows, a_bits, x.numel(),
                                                               [extra] if extra is not None else [], tensor_ext),
                           site.name)

        for _ in range(self.rounds):
            if adalog:
                self._search_post_gelu(act, x, uniform_fake(W, ws[:, None], wz[:, None], w_bits), bias, y, x_max)
            xq = x if act is None else act.fake_quant(x)

            def w_out(s, z):
                wq = uniform_fake(W[None], s[..., None], z[..., None], w_bits)  # [k, out, in]
                o = xq @ wq.transpose(1, 2)
                if bias is not None:
                    o.add_(bias)
                return o.sub_(y).square_().mean(1)

            ws, wz = self.search.search_uniform(w_out, W.t(), w_bits, n * c_out + W.numel(), [(ws, wz)])
            if act is None or adalog:
                continue
            wq = uniform_fake(W, ws[:, None], wz[:, None], w_bits)

            def a_out(s, z):
                out = F.linear(uniform_fake(x[None], s[..., None], z[..., None], a_bits), wq, bias)
                return out.sub_(y).square_().mean((1, 2))[:, None]

            starts = [(act.scale, act.zero_point)] + ([extra] if extra is not None else [])
            act = _uniform(a_bits, *self.search.search_uniform(a_out, x.reshape(-1, 1), a_bits, n * (c_in + c_out),
                                                               starts, tensor_ext), site.name)
        layer.weight_quantizer = _uniform(w_bits, ws, wz, f"{layer.name}.weight", channel_axis=0)
        site.enabled, site.quantizer = act is not None, act

    def _search_grouped(self, layer, x: torch.Tensor, w_bits: int, a_bits: int | None) -> None:
        """A grouped/depthwise conv is no single matmul: weights and input by their own quantization error."""
        W = layer.weight.detach().reshape(layer.weight.shape[0], -1).float()

        def w_self(s, z):
            return uniform_fake(W[None], s[..., None], z[..., None], w_bits).sub_(W).square_().mean(-1)

        ws, wz = self.search.search_uniform(w_self, W.t(), w_bits, W.numel())
        layer.weight_quantizer = _uniform(w_bits, ws, wz, f"{layer.name}.weight", channel_axis=0)
        site = layer.input_site
        if a_bits is None:
            site.enabled, site.quantizer = False, None
            return

        def a_self(s, z):
            return uniform_fake(x[None], s[..., None], z[..., None], a_bits).sub_(x).square_().mean((1, 2))[:, None]

        site.quantizer = _uniform(a_bits, *self.search.search_uniform(a_self, x.reshape(-1, 1), a_bits, x.numel()),
                                  site.name)
        site.enabled = True

    def _q_candidates(self, device) -> torch.Tensor:
        return torch.arange(self.opts.q_range[0], self.opts.q_range[1] + 1, dtype=torch.float32, device=device)[:, None]

    def _adalog_fake(self, x, s, q, bits, shift):
        """The AdaLog quantizer's fake quantization for candidate (s, q) tensors. With the exact table
        the search uses the closed form s·2^(−code·q/r), equal to the table form to 1 ulp and ~3×
        faster; the installed quantizer uses the table form."""
        codes, under = adalog_codes(x, s, q, self.opts.r, bits, shift)
        if self.opts.table == "exact":
            q = torch.as_tensor(q, dtype=torch.float32, device=x.device)
            # in place on the fresh codes tensor: the same operations and values as
            # (exp2(codes · (−q/r)) · s).masked_fill(under, 0) − shift
            return codes.mul_(-q / self.opts.r).exp2_().mul_(s).masked_fill_(under, 0.0).sub_(shift)
        value = adalog_dequantize(codes, under, s, q, self.opts.r, self.table)
        return value - shift

    def _fake_from_log(self, neg_log: torch.Tensor, q: torch.Tensor, bits: int, scale: torch.Tensor | None = None,
                       shift: float = 0.0) -> torch.Tensor:
        """`_adalog_fake(x, s, q, bits, shift)` (exact table) for candidates that share one scale s, from
        neg_log = −log2(((x + shift) / s).clamp_min(0)), computed once instead of once per candidate: the
        same operations on the same values, so the same result. scale None: s = 1 (· 1 left out)."""
        q = torch.as_tensor(q, dtype=torch.float32, device=neg_log.device)
        raw = (neg_log[None] * (self.opts.r / q)).round_()
        under = raw >= 2**bits
        out = raw.clamp_(0, 2**bits - 1).mul_(-q / self.opts.r).exp2_()
        if scale is not None:
            out.mul_(scale)
        out.masked_fill_(under, 0.0)
        return out.sub_(shift) if shift else out

    def _search_post_gelu(self, act: AdaLogQuantizer, x, wq, bias, y, x_max) -> None:
        """FPCS's combining search of (base, scale): the best top_k bases at the current scale, each
        combined with scales across [P90 of the positive inputs, max] + shift, then refined."""
        bits, n = act.bits, x.shape[0]
        floats = n * (x.shape[1] + wq.shape[0])

        def out_error(s, q):
            xh = self._adalog_fake(x[None], s[..., None], q[..., None], bits, GELU_SHIFT)
            return F.linear(xh, wq, bias).sub_(y).square_().mean((1, 2))[:, None]

        qs = self._q_candidates(x.device)
        if self.opts.table == "exact":  # every base at the current scale: −log2 of the ratio once
            neg_log = ((x + GELU_SHIFT) / act.scale).clamp_min(0).log2_().neg_()

            def first_error(s, q):
                xh = self._fake_from_log(neg_log, q[..., None], bits, act.scale, GELU_SHIFT)
                return F.linear(xh, wq, bias).sub_(y).square_().mean((1, 2))[:, None]
        else:
            first_error = out_error
        err = evaluate(first_error, act.scale.expand(len(qs), 1), qs, floats)
        top_q = qs[err[:, 0].topk(min(self.opts.top_k, len(qs)), largest=False).indices]  # [k, 1]
        pos = x[x > 0]
        # the code's candidates: from the 90th percentile of the positive inputs to the maximum, + shift
        lo = (torch.quantile(pos[:: -(-pos.numel() // 2**24)], 0.9) if pos.numel() else x_max) + GELU_SHIFT
        n_s = max(2, self.opts.candidates // len(top_q))
        scales = torch.linspace(float(lo), float(x_max + GELU_SHIFT), n_s, device=x.device).clamp_min(1e-8)
        # every base × every scale, and the current pair, so that a later round never ends worse
        s0 = torch.cat([scales.repeat(len(top_q))[:, None], act.scale.reshape(1, 1)])
        q0 = torch.cat([top_q.repeat_interleave(n_s, dim=0), qs.new_full((1, 1), act.q)])
        delta = (scales[1] - scales[0]).abs().clamp_min(1e-8).reshape(1)
        s, q = self.search.search(out_error, s0, q0, delta, floats)
        act.set_params(s, int(q.item()))

    # -- attention matmuls --------------------------------------------------------------------------
    @staticmethod
    def _install(site, bits, s, z, per_head: bool) -> None:
        if bits is None:
            site.quantizer, site.enabled = None, False
        elif per_head:
            site.quantizer, site.enabled = _uniform(bits, s, z, site.name, channel_axis=1), True
        else:  # 3-D operands ([B·H, N, d]) have no heads axis: one grid
            site.quantizer, site.enabled = _uniform(bits, s[0], z[0], site.name), True

    def _search_qk(self, sites: dict, q: torch.Tensor, kt: torch.Tensor, q_ext=None, k_ext=None) -> None:
        """q_ext, k_ext: exact per-head (min, max) when q and kt hold a subset of the images."""
        per_head = q.dim() == 4
        if not per_head:
            q, kt = q.unsqueeze(1), kt.unsqueeze(1)
        qb, kb = self._bits(sites["q"]), self._bits(sites["k"])
        bits, y = qb or kb or self.config.a_bits, q @ kt
        fq_q = (lambda t, s, z: t) if qb is None else (lambda t, s, z: uniform_fake(t, s, z, qb))  # noqa: E731
        fq_k = (lambda t, s, z: t) if kb is None else (lambda t, s, z: uniform_fake(t, s, z, kb))  # noqa: E731
        heads = lambda t: t.movedim(1, -1).reshape(-1, t.shape[1])  # noqa: E731
        bc = lambda p: p[:, None, :, None, None]  # noqa: E731  [k, H] -> [k, 1, H, 1, 1]
        qs, ks = _minmax(heads(q), qb or bits, q_ext), _minmax(heads(kt), kb or bits, k_ext)
        floats = y.numel() + q.numel()
        for _ in range(self.rounds):
            kq = fq_k(kt, ks[0][:, None, None], ks[1][:, None, None])

            def q_err(s, z):
                return (fq_q(q[None], bc(s), bc(z)) @ kq).sub_(y).square_().mean((1, 3, 4))

            if qb is not None:
                qs = self.search.search_uniform(q_err, heads(q), qb, floats, [qs], q_ext)
            qq = fq_q(q, qs[0][:, None, None], qs[1][:, None, None])

            def k_err(s, z):
                return (qq @ fq_k(kt[None], bc(s), bc(z))).sub_(y).square_().mean((1, 3, 4))

            if kb is not None:
                ks = self.search.search_uniform(k_err, heads(kt), kb, floats, [ks], k_ext)
        self._install(sites["q"], qb, *qs, per_head)
        self._install(sites["k"], kb, *ks, per_head)

    def _search_softmax_v(self, sites: dict, probs: torch.Tensor, v: torch.Tensor, v_ext=None) -> None:
        per_head = v.dim() == 4
        if not per_head:
            probs, v = probs.unsqueeze(1), v.unsqueeze(1)
        pb, vb = self._bits(sites["softmax"]), self._bits(sites["v"])
        y = probs @ v
        fq_v = (lambda t, s, z: t) if vb is None else (lambda t, s, z: uniform_fake(t, s, z, vb))  # noqa: E731
        heads = v.movedim(1, -1).reshape(-1, v.shape[1])
        vs = _minmax(heads, vb or self.config.a_bits, v_ext)
        one, qs = torch.ones(1, 1, device=v.device), self._q_candidates(v.device)
        # −log2 of the ratio adalog_codes computes, ((p + 0) / 1).clamp_min(0), bit for bit: it does not
        # depend on the base q, so the search computes it once instead of once per candidate
        neg_log = ((probs + 0.0) / one[0, 0]).clamp_min(0).log2_().neg_() if self.opts.table == "exact" else None
        floats = probs.numel() + y.numel()
        best_q = self.opts.r
        for _ in range(self.rounds):
            vq = fq_v(v, vs[0][:, None, None], vs[1][:, None, None])
            if pb is not None:

                def q_err(s, q):  # s = 1 (softmax ≤ 1), one base for the whole layer
                    if neg_log is None:
                        a = self._adalog_fake(probs[None], s[..., None, None, None], q[..., None, None, None], pb, 0.0)
                    else:
                        a = self._fake_from_log(neg_log, q[..., None, None, None], pb)
                    return (a @ vq).sub_(y).square_().mean((1, 2, 3, 4))[:, None]

                err = evaluate(q_err, one.expand(len(qs), 1), qs, floats)
                best_q = int(qs[err[:, 0].argmin(), 0])
                pq = self._adalog_fake(probs, one[0, 0], best_q, pb, 0.0)
            else:
                pq = probs

            def v_err(s, z):
                return (pq @ fq_v(v[None], s[:, None, :, None, None], z[:, None, :, None, None])).sub_(y).square_(
                ).mean((1, 3, 4))

            if vb is not None:
                vs = self.search.search_uniform(v_err, heads, vb, floats, [vs], v_ext)
        site = sites["softmax"]
        if pb is None:
            site.quantizer, site.enabled = None, False
        elif site.role != roles.POST_SOFTMAX:  # a mixed attention map (talking heads) is no probability
            site.quantizer, site.enabled = _uniform(pb, *_minmax(probs.reshape(-1, 1), pb), site.name), True
        else:
            soft = AdaLogQuantizer(pb, best_q, self.opts.r, table=self.opts.table, name=site.name)
            soft.set_params(1.0)
            site.quantizer, site.enabled = soft, True
        self._install(sites["v"], vb, *vs, per_head)

    # -- bias reparameterization --------------------------------------------------------------------
    @staticmethod
    def _fold_post_gelu_shifts(qmodel) -> None:
        for layer in qmodel.weight_layers().values():
            q = layer.input_site.quantizer
            if isinstance(q, AdaLogQuantizer) and q.shift and not q.shift_folded:
                # fold with the weight the layer will compute with (what freeze() writes), so exactly
                fold_input_shift(layer, q.shift, layer.weight_quantizer(layer.weight))
                q.shift_folded = True
