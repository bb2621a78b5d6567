"""A small ONNX graph builder: unique names, initializers, and the Q/DQ helpers export needs.

Kept separate from the ViT walker (onnx_qdq.py) so that the walker reads like the model's forward.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21  # Gelu (20), LayerNormalization (17), per-axis Q/DQ with saturating uint8/int8
IR_VERSION = 10  # ONNX Runtime ≥ 1.20 reads IR 10; onnx 1.17+ would otherwise write IR 11+


class GraphBuilder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._used: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}

    def fresh(self, base: str) -> str:
        n = self._used.get(base, 0)
        self._used[base] = n + 1
        return base if n == 0 else f"{base}__{n}"

    # -- values -------------------------------------------------------------------------------------
    def initializer(self, array: np.ndarray, name: str) -> str:
        name = self.fresh(name)
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))  # not ascontiguousarray: it makes 0-d arrays 1-d
        return name

    def const(self, values: Sequence[float] | Sequence[int] | float | int, dtype=np.int64) -> str:
        """A small shared constant (shapes, axes, scalars)."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(arr, "const")
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], name: str, domain: str = "", **attrs) -> str:
        """Add a one-output node; returns its output name."""
        out = self.fresh(name)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, domain=domain, **attrs))
        return out

    def op_multi(self, op_type: str, inputs: Sequence[str], names: Sequence[str], **attrs) -> list[str]:
        outs = [self.fresh(n) for n in names]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
        return outs

    def add_input(self, name: str, shape: Sequence, elem=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        self._used[name] = 1
        return name

    def add_output(self, value: str, name: str | None = None, shape: Sequence | None = None,
                   elem=TensorProto.FLOAT) -> str:
        if name is not None and name != value:
            value = self.op("Identity", [value], name)
        self.outputs.append(helper.make_tensor_value_info(value, elem, None if shape is None else list(shape)))
        return value

    # -- quantization -------------------------------------------------------------------------------
    def quantize(self, x: str, scale: np.ndarray, zero_point: np.ndarray, axis: int | None, name: str) -> str:
        """QuantizeLinear (x / scale, round half to even, + zero point, saturate to the zp dtype)."""
        s = self.initializer(scale.astype(np.float32), f"{name}.scale")
        z = self.initializer(zero_point, f"{name}.zero_point")
        attrs = {} if axis is None else {"axis": axis}
        return self.op("QuantizeLinear", [x, s, z], f"{name}.q", **attrs)

    def dequantize(self, q: str, scale: np.ndarray, zero_point: np.ndarray, axis: int | None, name: str) -> str:
        s = self.initializer(scale.astype(np.float32), f"{name}.dq_scale")
        z = self.initializer(zero_point, f"{name}.dq_zero_point")
        attrs = {} if axis is None else {"axis": axis}
        return self.op("DequantizeLinear", [q, s, z], f"{name}.dq", **attrs)

    # -- model --------------------------------------------------------------------------------------
    def model(self, producer: str, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        m = helper.make_model(graph, producer_name=producer, ir_version=IR_VERSION,
                              opset_imports=[helper.make_opsetid("", OPSET)])
        for k, v in (metadata or {}).items():
            m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
        return m
