"""The quantized twins of the layers a ViT is made of, registered by float module type.

`ActSite` is one activation quantization point; `QuantLinear`/`QuantConv2d` quantize their weight and
(through their input ActSite) their input. Attention needs no twin: its matmuls are intercepted
wherever they are computed (dispatch.py, handlers.py).

Every site can be put in `bypass` (float, for the float reference pass) or given an observer
(record, pass through float): that is all calibration needs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitquant.errors import UncalibratedError
from vitquant.models.dispatch import quiet
from vitquant.models.roles import OTHER, ROLES  # roles are derived by the tracer (roles.py)
from vitquant.quantizers import Quantizer

# float module type → quantized twin (ModelOpt's QuantModuleRegistry, optimum-quanto's register_qmodule)
TWINS: dict[type[nn.Module], type[nn.Module]] = {}


def register_twin(float_type: type[nn.Module]):
    """Class decorator: `float_type` modules are replaced by the decorated class (`cls.from_float`)."""

    def deco(cls):
        TWINS[float_type] = cls
        return cls

    return deco


def twin_class(module: nn.Module) -> tuple[type[nn.Module] | None, bool]:
    """(twin class, replaces): the twin of `module`'s exact type or of a registered base class whose
    forward it keeps replaces the module; a subclass with a forward of its own (timm's Conv2dSame pads
    first) keeps its forward and gets the twin as a sidecar sharing its weight — its F.conv2d/F.linear
    call on that weight is routed to the twin (dispatch.py), any other use of the weight is refused."""
    for base in type(module).__mro__:
        if base in TWINS:
            return TWINS[base], type(module).forward is base.forward
    return None, False


class ActSite(nn.Module):
    """One activation quantization point.

    enabled=False keeps this tensor in float by the method's explicit choice (recorded in the saved
    config); an enabled site without a fitted quantizer raises instead of guessing.
    """

    def __init__(self, name: str, role: str = OTHER, channel_axis: int | None = -1) -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"unknown site role {role!r}; known: {ROLES}")
        self.name, self.role, self.channel_axis = name, role, channel_axis
        self.quantizer: Quantizer | None = None
        self.enabled = True
        self.bypass = False
        self.observer = None  # set by calibration.observe(); never saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with quiet():  # the site's own arithmetic is not the model's (dispatch.py numbering)
            if self.observer is not None:
                self.observer.update(x)
            if self.bypass or not self.enabled:
                return x
            if self.quantizer is None:
                raise UncalibratedError(f"activation site {self.name!r} ({self.role}) has no calibrated quantizer")
            return self.quantizer(x)

    def extra_repr(self) -> str:
        return f"{self.name}, role={self.role}, enabled={self.enabled}"


class SoftmaxSite(ActSite):
    """The softmax and its output quantization point in one; its input is the attention *scores*.

    Used with the opt-in "attn_scores" site. A quantizer with `from_scores = True` (FQ-ViT's
    Log-Int-Softmax) computes the quantized probabilities from the quantized scores itself; any other
    quantizer sees the float softmax. Observers always record the float probabilities.
    """

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if not getattr(self.quantizer, "from_scores", False):
            return super().forward(scores.softmax(dim=-1))
        with quiet():
            if self.observer is not None:
                self.observer.update(scores.softmax(dim=-1))
            if self.bypass or not self.enabled:
                return scores.softmax(dim=-1)
            return self.quantizer(scores)


class _WeightQuantMixin:
    """Weights are fake-quantized once (`freeze_weight`) rather than at every forward.
    weight_enabled=False keeps the weight float (the per-site plan said so)."""

    weight: nn.Parameter
    weight_quantizer: Quantizer | None
    weight_frozen: bool
    weight_enabled: bool = True
    bypass: bool
    name: str

    def qweight(self) -> torch.Tensor:
        if self.bypass or self.weight_frozen or not self.weight_enabled:
            return self.weight
        if self.weight_quantizer is None:
            raise UncalibratedError(f"layer {self.name!r} has no calibrated weight quantizer")
        with quiet():
            return self.weight_quantizer(self.weight)

    @torch.no_grad()
    def freeze_weight(self) -> None:
        """Replace the float weight by its fake-quantized value (what a deployed int model computes)."""
        if not self.weight_enabled:
            return
        if self.weight_quantizer is None:
            raise UncalibratedError(f"layer {self.name!r} has no calibrated weight quantizer")
        if not self.weight_frozen:
            self.weight.copy_(self.weight_quantizer(self.weight))
            self.weight_frozen = True


_OWN_BIAS = object()


@register_twin(nn.Linear)
class QuantLinear(_WeightQuantMixin, nn.Module):
    def __init__(self, linear: nn.Linear, name: str, input_role: str = OTHER) -> None:
        super().__init__()
        self.name = name
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_site = ActSite(f"{name}.input", input_role)
        self.output_site: ActSite | None = None  # opt-in extra site (branch_out, logits)
        self.weight_quantizer = None
        self.weight_frozen = False
        self.bypass = False
        # Built without a bias, a bias it gets later (a scale mapping's shift) adds to one a caller passes
        self.own_bias_adds = linear.bias is None

    @classmethod
    def from_float(cls, module: nn.Linear, name: str) -> "QuantLinear":
        return cls(module, name)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = _OWN_BIAS) -> torch.Tensor:
        """bias: what a caller passed when it computed `F.linear(x, self.weight, bias)` itself (BEiT's
        q/v biases, torchvision's Swin); the dispatcher routes such calls here."""
        if bias is _OWN_BIAS or bias is self.bias:
            bias = self.bias
        elif self.bias is not None and self.own_bias_adds:
            bias = self.bias if bias is None else bias + self.bias
        y = F.linear(self.input_site(x), self.qweight(), bias)
        return y if self.output_site is None else self.output_site(y)

    def extra_repr(self) -> str:
        return f"{self.name}: {self.in_features} -> {self.out_features}"


@register_twin(nn.Conv2d)
class QuantConv2d(_WeightQuantMixin, nn.Module):
    def __init__(self, conv: nn.Conv2d, name: str, input_role: str = OTHER) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode={conv.padding_mode!r} is not supported")
        self.name = name
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.input_site = ActSite(f"{name}.input", input_role, channel_axis=1)
        self.output_site: ActSite | None = None
        self.weight_quantizer = None
        self.weight_frozen = False
        self.bypass = False

    @classmethod
    def from_float(cls, module: nn.Conv2d, name: str) -> "QuantConv2d":
        return cls(module, name)

    def forward(self, x: torch.Tensor, call: tuple | None = None) -> torch.Tensor:
        """call: (bias, stride, padding, dilation, groups) of an `F.conv2d(x, self.weight, …)` made outside
        the twin (routed here by the dispatcher), used as given."""
        bias, stride, padding, dilation, groups = call or (self.bias, self.stride, self.padding, self.dilation,
                                                           self.groups)
        y = F.conv2d(self.input_site(x), self.qweight(), bias, stride, padding, dilation, groups)
        return y if self.output_site is None else self.output_site(y)

    def extra_repr(self) -> str:
        return f"{self.name}: {tuple(self.weight.shape)}, stride={self.stride}, groups={self.groups}"
