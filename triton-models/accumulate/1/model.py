"""accumulate: a stateful model. TOTAL = the running sum of INPUT over the requests of its
sequence so far (Triton's sequence batcher: sequence_id, sequence_start, sequence_end). The
state lives in this instance of this server only, so a sequence's requests must all reach it:
a request that continues a sequence this instance did not start is answered with an error.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

# Sequences whose end never came (the client left) are forgotten oldest first past this.
MAX_OPEN = 4096


class TritonPythonModel:
    def initialize(self, args):
        self.sums = {}

    def execute(self, requests):
        out = []
        for r in requests:
            def scalar(name):
                return pb_utils.get_input_tensor_by_name(r, name).as_numpy().reshape(-1)[0]

            corrid = int(scalar("CORRID"))
            if scalar("START"):
                self.sums.pop(corrid, None)
                if len(self.sums) >= MAX_OPEN:
                    self.sums.pop(next(iter(self.sums)))
                self.sums[corrid] = 0.0
            elif corrid not in self.sums:
                out.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(
                            f"accumulate: sequence {corrid} was not started on this server"
                        )
                    )
                )
                continue
            self.sums[corrid] += float(scalar("INPUT"))
            total = np.array([[self.sums[corrid]]], dtype=np.float32)
            if scalar("END"):
                del self.sums[corrid]
            out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("TOTAL", total)]))
        return out
