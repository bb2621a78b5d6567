"""Quantizers: pure tensor math, fitted from a tensor or an observer's sample."""
from vitquant.quantizers.adalog import AdaLogQuantizer
from vitquant.quantizers.base import Quantizer, quantizer_from_spec, register_quantizer
from vitquant.quantizers.log import Log2Quantizer, LogSqrt2Quantizer
from vitquant.quantizers.log_int_softmax import LogIntSoftmaxQuantizer
from vitquant.quantizers.noisy import NoisyBiasQuantizer
from vitquant.quantizers.ptf import PowerOfTwoFactorQuantizer
from vitquant.quantizers.ranges import RangeRule
from vitquant.quantizers.sulq import ShiftUniformLog2Quantizer
from vitquant.quantizers.tanq import TanQuantizer
from vitquant.quantizers.twin_uniform import TwinUniformGeluQuantizer, TwinUniformSoftmaxQuantizer
from vitquant.quantizers.uniform import UniformQuantizer

__all__ = [
    "AdaLogQuantizer",
    "Log2Quantizer",
    "LogIntSoftmaxQuantizer",
    "LogSqrt2Quantizer",
    "NoisyBiasQuantizer",
    "PowerOfTwoFactorQuantizer",
    "Quantizer",
    "RangeRule",
    "ShiftUniformLog2Quantizer",
    "TanQuantizer",
    "TwinUniformGeluQuantizer",
    "TwinUniformSoftmaxQuantizer",
    "UniformQuantizer",
    "quantizer_from_spec",
    "register_quantizer",
]
