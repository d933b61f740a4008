"""slow: OUTPUT = INPUT after a per-execution sleep, for timeout, overload and cancellation tests.

The delay is the config parameter DELAY_MS, or the largest `delay_ms` request parameter among the
requests of one execution.
"""
import json
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.delay_ms = int(params.get("DELAY_MS", {}).get("string_value", "200"))

    def execute(self, requests):
        asked = [json.loads(r.parameters() or "{}").get("delay_ms") for r in requests]
        asked = [int(a) for a in asked if a is not None]
        delay = max(asked) if asked else self.delay_ms
        time.sleep(delay / 1000.0)
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("OUTPUT", pb_utils.get_input_tensor_by_name(r, "INPUT").as_numpy())
                ]
            )
            for r in requests
        ]
