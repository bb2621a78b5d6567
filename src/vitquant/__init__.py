"""vitquant: post-training quantization of Vision Transformers.

    qmodel = vitquant.quantize(model, vitquant.QuantConfig.preset("w4a4", method="repq-vit"), calib)
"""
from vitquant import export  # callable: vitquant.export(qmodel, "model.onnx")
from vitquant.api import quantize
from vitquant.config import QuantConfig
from vitquant.errors import VitquantError
from vitquant.evaluate import EvalResult, evaluate
from vitquant.models import QuantizedModel
from vitquant.models.loading import load_model
from vitquant.serialization import load, save

__version__ = "0.1.0"
__all__ = ["EvalResult", "QuantConfig", "QuantizedModel", "VitquantError", "evaluate", "export", "load",
           "load_model", "quantize", "save"]
