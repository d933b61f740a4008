"""tiny_chat: a deterministic stand-in for a language model on a decoupled backend.

It answers the last user turn of a chat prompt rendered with its template (the text between
the last "<|user|>" line and its "<|end|>"), or the whole text when there is no such turn:
- it says that turn's tokens back, split as its tokenizer splits (runs of word characters,
  runs of other marks), each token one response, spacing as in the prompt;
- with `temperature` > 0 the tokens come in an order shuffled by `random_seed` (0 when not
  given), each after a space, so a seed gives the same text every time;
- at most `max_tokens` tokens (16 when not given); `top_p` must be within (0, 1];
- `stream` false sends the whole text as one response, as the TensorRT-LLM backend does;
- `delay_ms` sleeps between tokens (benchmarks and cancellation tests).

So a test can compute the answer, and the tokenizer's count of it is the number of responses.
"""
import random
import re
import threading
import time

import numpy as np

import triton_python_backend_utils as pb_utils

TOKEN = re.compile(r"\w+|[^\w\s]+")
USER_TURN = re.compile(r"<\|user\|>\n(.*?)<\|end\|>", re.S)
DEFAULT_MAX_TOKENS = 16
LIMIT = 100_000


def scalar(request, name, default):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return default if t is None else t.as_numpy().reshape(-1)[0]


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
            self.answer(request, sender)
        except Exception as e:  # an error response ends the request
            sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        finally:
            with self.lock:
                self.running -= 1
                self.idle.notify_all()

    @staticmethod
    def deltas(text, temperature, seed):
        turns = USER_TURN.findall(text)
        said = turns[-1] if turns else text
        found = list(TOKEN.finditer(said))
        if temperature > 0:
            tokens = [m.group() for m in found]
            random.Random(seed).shuffle(tokens)
            return [t if i == 0 else " " + t for i, t in enumerate(tokens)]
        out, end = [], None
        for m in found:
            space = end is not None and m.start() > end
            out.append((" " if space else "") + m.group())
            end = m.end()
        return out

    def answer(self, request, sender):
        text = scalar(request, "text_input", b"")
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        max_tokens = int(scalar(request, "max_tokens", DEFAULT_MAX_TOKENS))
        if not 1 <= max_tokens <= LIMIT:
            raise ValueError(f"max_tokens must be within 1..{LIMIT}, got {max_tokens}")
        temperature = float(scalar(request, "temperature", 0.0))
        if temperature < 0:
            raise ValueError(f"temperature must be at least 0, got {temperature}")
        top_p = float(scalar(request, "top_p", 1.0))
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be within (0, 1], got {top_p}")
        seed = int(scalar(request, "random_seed", 0))
        stream = bool(scalar(request, "stream", True))
        delay_s = int(scalar(request, "delay_ms", 0)) / 1000.0
        deltas = self.deltas(text, temperature, seed)[:max_tokens]
        if not stream:
            deltas = ["".join(deltas)]
        for i, delta in enumerate(deltas):
            if request.is_cancelled():
                break
            if delay_s and i:
                time.sleep(delay_s)
            sender.send(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("text_output", np.array([delta.encode()], dtype=np.object_))
                    ]
                )
            )
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        with self.lock:
            self.idle.wait_for(lambda: self.running == 0, timeout=5)
