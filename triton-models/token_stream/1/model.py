"""token_stream: a decoupled model that answers one request with `max_tokens` responses.

Response i carries `text_output` = the (i mod n)-th word of `text_input` (or "tok<i>" when the
text has no words) and `index` = i, sent `delay_ms` apart (default 0), then a final flag with
no response. It is the stand-in for a language model served by a decoupled backend.

Each request runs on its own thread, so concurrent streams interleave as a real LLM backend's
do. A request that Triton cancels stops at once; with the request parameter `cancel_log` (a
file path), the model appends "<request id> <responses sent> <unix time, s>" to that file
when it sees the cancellation, so a test can tell when it did.
"""
import json
import threading
import time

import numpy as np

import triton_python_backend_utils as pb_utils

# Sleeps between two looks at is_cancelled(): 2 ms at first, growing with the wait to at most
# 50 ms, so a thousand idle requests do not spend the CPU looking.
SLICE_S = 0.002
MAX_SLICE_S = 0.05
MAX_TOKENS = 100_000


class TritonPythonModel:
    def initialize(self, args):
        self.running = 0
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)

    def execute(self, requests):
        for request in requests:
            with self.lock:
                self.running += 1
            threading.Thread(target=self.generate, args=(request,), daemon=True).start()
        return None

    def generate(self, request):
        sender = request.get_response_sender()
        try:
            self.stream(request, sender)
        except Exception as e:  # an error response ends the request
            sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        finally:
            with self.lock:
                self.running -= 1
                self.idle.notify_all()

    def stream(self, request, sender):
        params = json.loads(request.parameters() or "{}")
        text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        n = int(pb_utils.get_input_tensor_by_name(request, "max_tokens").as_numpy().reshape(-1)[0])
        if n < 0 or n > MAX_TOKENS:
            raise ValueError(f"max_tokens must be within 0..{MAX_TOKENS}, got {n}")
        delay = pb_utils.get_input_tensor_by_name(request, "delay_ms")
        delay_s = 0.0 if delay is None else int(delay.as_numpy().reshape(-1)[0]) / 1000.0
        words = text.split()
        for i in range(n):
            if self.wait(request, delay_s if i else 0.0):
                self.cancelled(request, params, i)
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            word = words[i % len(words)] if words else f"tok{i}"
            sender.send(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("text_output", np.array([word.encode()], dtype=np.object_)),
                        pb_utils.Tensor("index", np.array([i], dtype=np.int32)),
                    ]
                )
            )
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    @staticmethod
    def wait(request, seconds):
        """Sleeps `seconds` in short slices; True as soon as the request is cancelled."""
        start = time.monotonic()
        end = start + seconds
        while True:
            if request.is_cancelled():
                return True
            now = time.monotonic()
            if now >= end:
                return False
            slice_s = min(max(SLICE_S, (now - start) / 10), MAX_SLICE_S)
            time.sleep(min(slice_s, end - now))

    @staticmethod
    def cancelled(request, params, sent):
        path = params.get("cancel_log")
        if path:
            with open(path, "a") as f:
                f.write(f"{request.request_id()} {sent} {time.time():.6f}\n")

    def finalize(self):
        with self.lock:
            self.idle.wait_for(lambda: self.running == 0, timeout=5)
