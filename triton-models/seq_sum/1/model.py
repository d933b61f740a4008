"""seq_sum: a variable-length FP32 sequence; TOTAL = row sums, DOUBLED = 2 * SEQ."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            seq = pb_utils.get_input_tensor_by_name(request, "SEQ").as_numpy()
            total = seq.sum(axis=1, keepdims=True).astype(np.float32)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("TOTAL", total),
                        pb_utils.Tensor("DOUBLED", (seq * 2).astype(np.float32)),
                    ]
                )
            )
        return responses
