"""matrix_nobatch: OUT = 2 * IN + 1 on an INT32 [2, 3] matrix; the model has no batch dimension."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            m = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            out = (m * 2 + 1).astype(np.int32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUT", out)]))
        return responses
