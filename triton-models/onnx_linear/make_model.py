"""Writes 1/model.onnx: Y = MatMul(X, W) + b with fixed weights (needs `pip install onnx`).

W[i][j] = (i + 1) * (j + 1) / 10, b = [0.5, -1.0, 2.0]. The tests recompute this in numpy.
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

w = np.array([[(i + 1) * (j + 1) / 10 for j in range(3)] for i in range(4)], dtype=np.float32)
b = np.array([0.5, -1.0, 2.0], dtype=np.float32)
graph = helper.make_graph(
    [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "B"], ["Y"])],
    "linear",
    [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
    [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3])],
    initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, os.path.join(os.path.dirname(__file__), "1", "model.onnx"))
