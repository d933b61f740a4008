"""Streams through infergate against Triton directly, with Triton's own Python client and an
SSE client library (issue 44's must-shows).

    streams.py grpc TRITON_GRPC INFERGATE_GRPC      # 100 concurrent start_stream clients
    streams.py http TRITON_HTTP INFERGATE_HTTP      # generate / generate_stream: curl, sseclient

Each mode runs the same requests against both servers and compares what came back: every
response's id, outputs and `triton_final_response` flag, in order. Prints one line per check
and ends with "N passed, M failed"; exits non-zero on a failure.
"""
import json
import queue
import subprocess
import sys
import threading

import numpy as np
import urllib.request
import sseclient
import tritonclient.grpc as grpcclient

MODEL = "token_stream"
STREAMS = 100
WAIT_S = 60

results = {"passed": 0, "failed": 0}


def check(name, ok, detail=""):
    results["passed" if ok else "failed"] += 1
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + detail}", flush=True)


def inputs(text, n, delay_ms=0):
    t = grpcclient.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    m = grpcclient.InferInput("max_tokens", [1], "INT32")
    m.set_data_from_numpy(np.array([n], dtype=np.int32))
    d = grpcclient.InferInput("delay_ms", [1], "INT32")
    d.set_data_from_numpy(np.array([delay_ms], dtype=np.int32))
    return [t, m, d]


def one_stream(url, k):
    """Stream k: two requests multiplexed on one stream (the second asks for the empty final
    response), and what came back for each, in arrival order."""
    client = grpcclient.InferenceServerClient(url)
    got = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    words = " ".join(f"w{k}-{i}" for i in range(1 + k % 7))
    client.async_stream_infer(MODEL, inputs(words, 5 + k % 11, 1), request_id=f"s{k}a")
    client.async_stream_infer(
        MODEL, inputs(words[::-1], 3 + k % 5, 2), request_id=f"s{k}b",
        enable_empty_final_response=True,
    )
    per_request = {f"s{k}a": [], f"s{k}b": []}
    finals = 0
    while finals < 2:
        result, error = got.get(timeout=WAIT_S)
        if error is not None:
            raise RuntimeError(f"stream {k}: {error}")
        resp = result.get_response()
        final = resp.parameters["triton_final_response"].bool_param
        outs = {
            o.name: result.as_numpy(o.name).tolist() for o in resp.outputs
        }
        per_request[resp.id].append((outs, final))
        # The first request asks for no empty final response: its last token is its end.
        if final or (resp.id.endswith("a") and len(per_request[resp.id]) == 5 + k % 11):
            finals += 1
    client.stop_stream()
    client.close()
    return per_request


def all_streams(url):
    out, errors = [None] * STREAMS, []

    def run(k):
        try:
            out[k] = one_stream(url, k)
        except Exception as e:  # reported below
            errors.append(f"{k}: {e}")

    threads = [threading.Thread(target=run, args=(k,)) for k in range(STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    return out, errors


def grpc_mode(direct, gateway):
    want, e1 = all_streams(direct)
    got, e2 = all_streams(gateway)
    check("100 concurrent streams directly to Triton", not e1, "; ".join(e1[:3]))
    check("100 concurrent streams through infergate", not e2, "; ".join(e2[:3]))
    same = sum(1 for a, b in zip(want, got) if a == b and a is not None)
    first_diff = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), None)
    check(
        f"the same responses, order and final flags on {same} of {STREAMS} streams",
        same == STREAMS,
        f"stream {first_diff}: direct {want[first_diff]} infergate {got[first_diff]}"
        if first_diff is not None else "",
    )
    responses = sum(len(v) for s in got if s for v in s.values())
    empties = sum(
        1 for k, s in enumerate(got) if s for (outs, final) in s[f"s{k}b"] if not outs and final
    )
    check(f"{responses} responses relayed, {empties} empty final responses", empties == STREAMS,
          f"{empties} empty final responses, want {STREAMS}")


def curl(url, body):
    return subprocess.run(
        ["curl", "-sS", "-N", "-X", "POST", url, "-H", "Content-Type: application/json",
         "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=WAIT_S,
    ).stdout


def sse(url, body):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Accept": "text/event-stream", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=WAIT_S) as resp:
        return resp.status, [json.loads(e.data) for e in sseclient.SSEClient(resp).events()]


def http_mode(direct, gateway):
    one = {"text_input": "alpha beta", "max_tokens": 1, "id": "g1", "parameters": {"p": 1}}
    many = {"text_input": "one two three four", "max_tokens": 9, "delay_ms": 1, "id": "g2"}
    ordinary = {"INPUT0": list(range(16)), "INPUT1": [2] * 16}
    for path, body in [
        (f"/v2/models/{MODEL}/generate", one),
        (f"/v2/models/{MODEL}/generate_stream", many),
        (f"/v2/models/{MODEL}/versions/1/generate_stream", one),
        ("/v2/models/add_sub/generate", ordinary),
        ("/v2/models/add_sub/generate_stream", ordinary),
    ]:
        want, got = curl(direct + path, body), curl(gateway + path, body)
        parse = (lambda t: [json.loads(l[6:]) for l in t.splitlines() if l.startswith("data: ")]) \
            if path.endswith("_stream") else json.loads
        check(f"curl {path}: the same content", parse(want) == parse(got) and want.strip() != "",
              f"direct {want!r} infergate {got!r}")
    for body in [many, one]:
        (s1, want), (s2, got) = sse(direct + f"/v2/models/{MODEL}/generate_stream", body), \
            sse(gateway + f"/v2/models/{MODEL}/generate_stream", body)
        check(f"sseclient generate_stream of {body['max_tokens']}: the same {len(want)} events",
              (s1, want) == (s2, got) and len(want) == body["max_tokens"],
              f"direct {s1} {want} infergate {s2} {got}")


if __name__ == "__main__":
    mode, direct, gateway = sys.argv[1:4]
    if mode == "grpc":
        grpc_mode(direct, gateway)
    else:
        http_mode(direct, gateway)
    print(f"{results['passed']} passed, {results['failed']} failed")
    sys.exit(1 if results["failed"] else 0)
