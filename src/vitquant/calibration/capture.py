"""What a layer-wise scale search needs from the float model: each layer's input and, for
Hessian-guided metrics, the gradient of the task loss at the layer's output; each attention core's
operands and the gradients at its two products.

PTQ4ViT (Yuan et al., ECCV'22, §4.2) weighs a layer's output error by (∂L/∂O)², the diagonal of the
Fisher approximation of the Hessian: min E[(O − Ô)ᵀ diag((∂L/∂O)²) (O − Ô)]. Calibration images carry
no labels, so L is the cross-entropy of the model's logits against the float model's own top-1
prediction (`pseudo_label_loss`). Its gradient softmax(z) − onehot(argmax z) is nonzero at the float
model, unlike the KL(p_FP ‖ p) of the official code, which vanishes there (PTQ4ViT issue #23).

Every tensor comes from the *float* model (parallel calibration). Layers are hooked as modules; cores
through the taps of their dispatch handlers (models/handlers.py), so the same code serves fused SDPA,
eager matmuls and any family. Groups are captured one at a time: memory holds one unit's tensors.

Bounded captures (`Subsample`), for searches whose cost grows with the rows they evaluate: a Linear
keeps at most `rows[layer]` of its input rows (tokens), a seeded uniform sample over all calibration
images, with the same rows of its output gradient; a core keeps the operands of at most `core_images`
images (a seeded subset). The exact per-channel (per-head) minimum and maximum of the full tensors
are recorded either way (`lo`/`hi`), so candidate grids built from the extremes do not change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from vitquant.models.dispatch import quiet
from vitquant.models.handlers import AttentionSites, MatmulSites
from vitquant.models.io import logits_of
from vitquant.models.qmodules import QuantConv2d, QuantLinear
from vitquant.models.quantized import QuantizedModel
from vitquant.models.structure import Core


@dataclass
class LayerCapture:
    x: torch.Tensor  # the layer's float input, [B, ...] over all calibration batches ([rows, in] if subsampled)
    grad: torch.Tensor | None  # ∂L/∂(layer output), same shape as the output ([rows, out] if subsampled)
    lo: torch.Tensor | None = None  # exact per-input-channel min over every row (only when subsampled)
    hi: torch.Tensor | None = None  # exact per-input-channel max over every row (only when subsampled)


@dataclass
class CoreCapture:
    q: torch.Tensor  # first operand of Q·Kᵀ, [B, H, N, d] (heads axis 1 when 4-D)
    kt: torch.Tensor  # second operand as multiplied: q @ kt is the scores product (before any scale)
    v: torch.Tensor  # second operand of probs·V
    probs: torch.Tensor  # first operand of probs·V
    grad_scores: torch.Tensor | None  # ∂L/∂(q @ kt)
    grad_context: torch.Tensor | None  # ∂L/∂(probs @ v)
    # exact min/max of each operand over every image, per head ([H]; [1] for 3-D operands), only when
    # the operands are those of a subset of the images: {"q": (lo, hi), "kt": …, "v": …, "probs": …}
    extremes: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class Subsample:
    """What a bounded capture keeps: `rows[layer]` rows of each Linear's input (a layer not named keeps
    all; a callable gets the layer's total row count and returns how many to keep), the operands of
    `core_images` images per core (None: all). `seed` fixes the samples."""

    rows: dict[str, int | Callable[[int], int]] | None = None
    core_images: int | None = None
    seed: int = 0


class _RowSample:
    """The seeded row indices of one layer, handed out batch by batch (rows in forward order)."""

    def __init__(self, keep: int, n_images: int, seed: int) -> None:
        self.keep, self.n_images, self.seed = keep, n_images, seed
        self.index: torch.Tensor | None = None
        self.offset = 0
        self.lo = self.hi = None

    def resolve(self, total: int) -> int:
        """The rows kept of a layer input with `total` rows (a callable keep is asked once)."""
        if callable(self.keep):
            self.keep = int(self.keep(total))
        return self.keep

    def take(self, rows: torch.Tensor, batch_images: int) -> torch.Tensor:
        """The sampled rows of this batch's [rows, C] (and their positions, kept for the gradient)."""
        lo, hi = rows.amin(dim=0), rows.amax(dim=0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if self.index is None:
            total = rows.shape[0] // max(1, batch_images) * self.n_images
            gen = torch.Generator().manual_seed(self.seed)
            self.index = torch.randperm(total, generator=gen)[: self.keep].sort().values.to(rows.device)
        start, self.offset = self.offset, self.offset + rows.shape[0]
        local = self.index[(self.index >= start) & (self.index < self.offset)] - start
        return local


def pseudo_label_loss(logits: torch.Tensor) -> torch.Tensor:
    """CE(z, argmax z), summed over the batch, in float64: for confident samples softmax(z) − 1 is below
    float32 resolution, and a gradient rounded to zero would make every scale candidate tie."""
    z = logits.double()
    return F.cross_entropy(z, z.argmax(dim=-1), reduction="sum")


def _select_images(t: torch.Tensor, images: torch.Tensor | None, batch_images: int) -> torch.Tensor:
    """The rows of `t` that belong to `images` (positions in the batch); [B·H, N, d] operands hold
    image i in rows i·H … (i+1)·H − 1."""
    if images is None:
        return t
    if t.shape[0] == batch_images:
        return t[images]
    per = t.shape[0] // batch_images
    return t[(images[:, None] * per + torch.arange(per, device=t.device)).reshape(-1)]


class CoreTap:
    """Set as `tap` on a core's handlers: keeps the operands, and the gradients at both products."""

    output_only = False

    def __init__(self, grad: bool) -> None:
        self.grad = grad
        self.store: dict[str, list[torch.Tensor]] = {k: [] for k in ("q", "kt", "v", "probs", "gs", "gc")}
        self.images: torch.Tensor | None = None  # this batch's kept images (None: all), set per batch
        self.batch_images = 0
        self.extremes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _keep(self, key: str, t: torch.Tensor) -> None:
        t = t.detach()
        if self.images is not None:  # the exact extremes of the whole tensor, per head
            dims = (0, *range(2, t.dim())) if t.dim() == 4 else tuple(range(t.dim()))
            lo, hi = t.amin(dim=dims).reshape(-1), t.amax(dim=dims).reshape(-1)
            if key in self.extremes:
                lo, hi = torch.minimum(self.extremes[key][0], lo), torch.maximum(self.extremes[key][1], hi)
            self.extremes[key] = (lo, hi)
        self.store[key].append(_select_images(t, self.images, self.batch_images))

    def _grad(self, key: str, t: torch.Tensor) -> None:
        if self.grad and t.requires_grad:
            images, batch_images = self.images, self.batch_images  # this batch's

            def keep(g: torch.Tensor) -> None:
                self.store[key].append(_select_images(g.detach(), images, batch_images))

            t.register_hook(keep)

    def record(self, kind: str, **t: torch.Tensor) -> None:
        with quiet():
            if kind == "attention":
                for key in ("q", "kt", "v", "probs"):
                    self._keep(key, t[key])
                self._grad("gs", t["product"])
                self._grad("gc", t["context"])
            elif self.role == "qk":
                self._keep("q", t["a"])
                self._keep("kt", t["b"])
                self._grad("gs", t["product"])
            else:
                self._keep("probs", t["a"])
                self._keep("v", t["b"])
                self._grad("gc", t["product"])

    role = "attention"

    def result(self, shared: "CoreTap | None" = None) -> CoreCapture:
        s = self.store if shared is None else {k: self.store[k] or shared.store[k] for k in self.store}
        cat = lambda k: torch.cat(s[k]) if s[k] else None  # noqa: E731
        # backward runs the batches' gradients in the order of the forwards, one batch at a time
        return CoreCapture(cat("q"), cat("kt"), cat("v"), cat("probs"), cat("gs"), cat("gc"), self.extremes or None)


def _attach(qmodel: QuantizedModel, core: Core, grad: bool) -> list[tuple[object, CoreTap]]:
    handlers = [qmodel.submodule(h) for h in core.handlers]
    if len(handlers) == 1 and isinstance(handlers[0], AttentionSites):
        tap = CoreTap(grad)
        handlers[0].tap = tap
        return [(handlers[0], tap)]
    taps = []
    for h in handlers:
        assert isinstance(h, MatmulSites)
        tap = CoreTap(grad)
        tap.role = "qk" if h.a_site.name == core.q else "pv"
        h.tap = tap
        taps.append((h, tap))
    return taps


def capture(
    qmodel: QuantizedModel, layers: list[QuantLinear | QuantConv2d], cores: list[Core],
    batches: list[torch.Tensor], with_grad: bool, subsample: Subsample | None = None,
    run: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[dict[str, LayerCapture], dict[str, CoreCapture]]:
    """Float inputs (and output gradients) of `layers`, and the operands (and product gradients) of
    `cores`, over all `batches` (or the bounded samples `subsample` asks for). run(i, batch): what
    computes batch i (default: the model, and with_grad the backward of `pseudo_label_loss`), e.g. one
    unit on its recorded inputs, backpropagating a recorded gradient."""
    inputs: dict[str, list] = {l.name: [] for l in layers}
    grads: dict[str, list] = {l.name: [] for l in layers}
    hooks, taps = [], {}
    n_images = sum(len(x) for x in batches)
    batch_images = [0]  # images in the batch being run
    samples: dict[str, _RowSample] = {}
    if subsample is not None and subsample.rows:
        for i, layer in enumerate(layers):
            keep = subsample.rows.get(layer.name)
            if keep is not None and isinstance(layer, QuantLinear):
                samples[layer.name] = _RowSample(keep, n_images, subsample.seed * 1_000_003 + i)

    def layer_hook(module, args, out):
        with quiet():
            x = args[0].detach()
            sample = samples.get(module.name)
            total = x.reshape(-1, x.shape[-1]).shape[0] // max(1, batch_images[0]) * n_images
            if sample is None or total <= sample.resolve(total):
                inputs[module.name].append(x)
                if with_grad and out.requires_grad:
                    out.register_hook(lambda g: grads[module.name].append(g.detach()))
                return
            rows = x.reshape(-1, x.shape[-1])
            local = sample.take(rows, batch_images[0])
            inputs[module.name].append(rows[local])
            if with_grad and out.requires_grad:
                out.register_hook(lambda g: grads[module.name].append(g.detach().reshape(-1, g.shape[-1])[local]))

    for layer in layers:
        hooks.append(layer.register_forward_hook(layer_hook))
    for core in cores:
        taps[core.name] = _attach(qmodel, core, with_grad)
    core_images = None
    if subsample is not None and subsample.core_images is not None and subsample.core_images < n_images:
        gen = torch.Generator().manual_seed(subsample.seed * 1_000_003 + 999_983)
        core_images = torch.randperm(n_images, generator=gen)[: subsample.core_images].sort().values
    params = list(qmodel.parameters())
    trainable = [p.requires_grad for p in params]
    try:
        for p in params:  # gradients w.r.t. activations only: no weight gradients are computed
            p.requires_grad_(False)
        with qmodel.bypassed():
            start = 0
            for i, x in enumerate(batches):
                batch_images[0] = len(x)
                if core_images is not None:
                    here = core_images[(core_images >= start) & (core_images < start + len(x))] - start
                    for pairs in taps.values():
                        for _, tap in pairs:
                            tap.images, tap.batch_images = here.to(x.device), len(x)
                start += len(x)
                if run is not None:
                    run(i, x)
                elif with_grad:
                    with torch.enable_grad():
                        pseudo_label_loss(logits_of(qmodel(x.clone().requires_grad_(True)))).backward()
                else:
                    with torch.no_grad():
                        qmodel(x)
    finally:
        for h in hooks:
            h.remove()
        for pairs in taps.values():
            for handler, _ in pairs:
                handler.tap = None
        for p, t in zip(params, trainable):
            p.requires_grad_(t)
    layer_caps = {}
    for name in inputs:
        sample = samples.get(name)
        sampled = sample is not None and sample.index is not None
        layer_caps[name] = LayerCapture(torch.cat(inputs[name]), torch.cat(grads[name]) if grads[name] else None,
                                        sample.lo if sampled else None, sample.hi if sampled else None)
    core_caps = {}
    for name, pairs in taps.items():
        if len(pairs) == 1:
            core_caps[name] = pairs[0][1].result()
        else:
            merged = CoreTap(with_grad)
            for _, tap in pairs:
                for k, v in tap.store.items():
                    merged.store[k] += v
                merged.extremes.update(tap.extremes)
            core_caps[name] = merged.result()
    return layer_caps, core_caps
