"""slow: OUTPUT = INPUT after a per-execution sleep, for timeout, overload and cancellation tests.

The delay is the config parameter DELAY_MS, or the largest `delay_ms` request parameter among the
requests of one execution. A request with the parameter `report_timeout` gets, in place of its
INPUT, the timeout Triton holds for it (the `timeout` request parameter, in microseconds; 0 when
none was sent), so tests can see what a front end forwarded.
"""
import json
import time

import numpy as np

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.delay_ms = int(params.get("DELAY_MS", {}).get("string_value", "200"))

    def execute(self, requests):
        params = [json.loads(r.parameters() or "{}") for r in requests]
        asked = [int(p["delay_ms"]) for p in params if "delay_ms" in p]
        delay = max(asked) if asked else self.delay_ms
        time.sleep(delay / 1000.0)
        return [
            pb_utils.InferenceResponse(output_tensors=[self.output(r, p)])
            for r, p in zip(requests, params)
        ]

    @staticmethod
    def output(request, params):
        value = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
        if "report_timeout" in params:
            value = np.full(value.shape, request.timeout(), dtype=np.float32)
        return pb_utils.Tensor("OUTPUT", value)
