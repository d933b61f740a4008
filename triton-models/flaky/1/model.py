"""flaky: OUTPUT = INPUT, unless its control file (config parameter CONTROL_FILE) says otherwise.

The file holds `fail` (every request answers an error), `slow:MS` (each execution sleeps MS
milliseconds first) or nothing (no file: healthy). Read at each execution, so a test can stop a
model, slow it and let it recover while Triton runs (route fallbacks and circuit breakers).
"""
import json
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.control = params.get("CONTROL_FILE", {}).get(
            "string_value", "/tmp/infergate-flaky-control"
        )

    def mode(self):
        try:
            with open(self.control) as f:
                return f.read().strip()
        except OSError:
            return ""

    def execute(self, requests):
        mode = self.mode()
        if mode.startswith("slow:"):
            time.sleep(int(mode[5:]) / 1000.0)
        out = []
        for r in requests:
            if mode == "fail":
                out.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError("flaky: failing on purpose")
                    )
                )
                continue
            x = pb_utils.get_input_tensor_by_name(r, "INPUT").as_numpy()
            out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", x)]))
        return out
