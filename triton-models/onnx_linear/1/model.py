"""onnx_linear: Y = X . W + b, computed by onnxruntime from model.onnx beside this file.

All requests of one execution are concatenated into one onnxruntime run and split back.
"""
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(os.path.dirname(__file__), "model.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, "X").as_numpy() for r in requests]
        rows = [x.shape[0] for x in xs]
        (y,) = self.session.run(["Y"], {"X": np.concatenate(xs).astype(np.float32)})
        responses, start = [], 0
        for n in rows:
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("Y", y[start : start + n])])
            )
            start += n
        return responses
