"""Runs the same tritonclient calls against Triton and against infergate and compares them.

Usage: conformance.py TRITON_GRPC TRITON_HTTP INFERGATE_GRPC INFERGATE_HTTP   (host:port each)

Every model in triton-models/ is called over gRPC and HTTP (binary tensor data on, as
tritonclient does by default, and off), plus metadata, config, readiness and bad requests.
Prints one line per check and a final 'N passed, N failed'; exits non-zero on any failure.
"""
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

TRITON_GRPC, TRITON_HTTP, GATE_GRPC, GATE_HTTP = sys.argv[1:5]
rng = np.random.default_rng(7)
results = {"passed": 0, "failed": 0}


def check(name, ok, detail=""):
    results["passed" if ok else "failed"] += 1
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail if not ok else ''}", flush=True)


def cases():
    """(model, {input: array}, [outputs]) for every model of the repository."""
    a = rng.standard_normal((3, 16)).astype(np.float32)
    b = rng.standard_normal((3, 16)).astype(np.float32)
    text = np.array([[b"hello"], [b"Triton"], [b""]], dtype=np.object_)
    seq = rng.standard_normal((2, 7)).astype(np.float32)
    mat = np.arange(6, dtype=np.int32).reshape(2, 3)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    return [
        ("add_sub", {"INPUT0": a, "INPUT1": b}, ["OUTPUT0", "OUTPUT1"]),
        ("onnx_linear", {"X": x}, ["Y"]),
        ("text_stats", {"TEXT": text}, ["UPPER", "LENGTH"]),
        ("seq_sum", {"SEQ": seq}, ["TOTAL", "DOUBLED"]),
        ("matrix_nobatch", {"IN": mat}, ["OUT"]),
        ("slow", {"INPUT": np.array([[1.5]], dtype=np.float32)}, ["OUTPUT"]),
    ]


def expected(model, inputs):
    if model == "add_sub":
        return {"OUTPUT0": inputs["INPUT0"] + inputs["INPUT1"], "OUTPUT1": inputs["INPUT0"] - inputs["INPUT1"]}
    if model == "onnx_linear":
        w = np.array([[(i + 1) * (j + 1) / 10 for j in range(3)] for i in range(4)], dtype=np.float32)
        return {"Y": inputs["X"] @ w + np.array([0.5, -1.0, 2.0], dtype=np.float32)}
    if model == "text_stats":
        t = inputs["TEXT"]
        return {
            "UPPER": np.array([[s.upper() for s in row] for row in t], dtype=np.object_),
            "LENGTH": np.array([[len(s) for s in row] for row in t], dtype=np.int32),
        }
    if model == "seq_sum":
        s = inputs["SEQ"]
        return {"TOTAL": s.sum(axis=1, keepdims=True), "DOUBLED": s * 2}
    if model == "matrix_nobatch":
        return {"OUT": inputs["IN"] * 2 + 1}
    return {"OUTPUT": inputs["INPUT"]}


def infer(mod, url, model, inputs, outputs, binary):
    client = mod.InferenceServerClient(url)
    ins = []
    for name, arr in inputs.items():
        t = mod.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        if mod is httpclient:
            t.set_data_from_numpy(arr, binary_data=binary)
        else:
            t.set_data_from_numpy(arr)
        ins.append(t)
    if mod is httpclient:
        outs = [mod.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    else:
        outs = [mod.InferRequestedOutput(o) for o in outputs]
    r = client.infer(model, ins, outputs=outs, request_id="req-1")
    return {o: r.as_numpy(o) for o in outputs}, r.get_response()


def same(x, y):
    if x.dtype == np.object_ or y.dtype == np.object_:
        as_bytes = lambda v: v.encode() if isinstance(v, str) else bytes(v)
        return x.shape == y.shape and all(as_bytes(p) == as_bytes(q) for p, q in zip(x.ravel(), y.ravel()))
    return x.dtype == y.dtype and x.shape == y.shape and np.allclose(x, y, rtol=1e-5, atol=1e-5)


for model, inputs, outputs in cases():
    want = expected(model, inputs)
    for proto, mod, t_url, g_url in [("grpc", grpcclient, TRITON_GRPC, GATE_GRPC), ("http", httpclient, TRITON_HTTP, GATE_HTTP)]:
        for binary in ([True, False] if proto == "http" else [True]):
            tag = f"{proto}{'' if binary else '-json'} {model}"
            try:
                direct, _ = infer(mod, t_url, model, inputs, outputs, binary)
                via, _ = infer(mod, g_url, model, inputs, outputs, binary)
            except InferenceServerException as e:
                check(tag, False, str(e))
                continue
            check(f"{tag}: infergate == Triton", all(same(direct[o], via[o]) for o in outputs),
                  f"direct={direct} via={via}")
            check(f"{tag}: correct result", all(same(via[o], np.asarray(want[o]).astype(via[o].dtype)) for o in outputs))

# Metadata, config and health through both protocols.
for proto, mod, t_url, g_url in [("grpc", grpcclient, TRITON_GRPC, GATE_GRPC), ("http", httpclient, TRITON_HTTP, GATE_HTTP)]:
    t, g = mod.InferenceServerClient(t_url), mod.InferenceServerClient(g_url)
    check(f"{proto} server live/ready", g.is_server_live() and g.is_server_ready())
    for model, _, _ in cases():
        kw = {"as_json": True} if proto == "grpc" else {}
        tm, gm = t.get_model_metadata(model, **kw), g.get_model_metadata(model, **kw)
        check(f"{proto} {model} metadata", tm == gm, f"{tm} != {gm}")
        tc, gc = t.get_model_config(model, **kw), g.get_model_config(model, **kw)
        if proto == "grpc":
            tc, gc = tc["config"], gc["config"]
        keys = ["name", "backend", "max_batch_size", "input", "output", "dynamic_batching"]
        tsub = {k: tc.get(k) for k in keys}
        gsub = {k: gc.get(k) for k in keys}
        # Triton prints a few fields infergate's config subset does not carry; compare tensors field by field.
        if tsub.get("input"):
            for part in ("input", "output"):
                for d in tsub[part] + (gsub[part] or []):
                    for extra in ("is_non_linear_format_io",):
                        d.pop(extra, None)
        check(f"{proto} {model} config", tsub == gsub, f"{tsub} != {gsub}")
        check(f"{proto} {model} ready", g.is_model_ready(model) == t.is_model_ready(model) == True)
    tsm, gsm = t.get_server_metadata(**({"as_json": True} if proto == "grpc" else {})), g.get_server_metadata(**({"as_json": True} if proto == "grpc" else {}))
    check(f"{proto} server metadata", tsm["name"] == gsm["name"] and tsm["version"] == gsm["version"]
          and set(gsm["extensions"]) <= set(tsm["extensions"]), f"{tsm} vs {gsm}")
    st = g.get_inference_statistics("add_sub", **({"as_json": True} if proto == "grpc" else {}))
    check(f"{proto} statistics", st["model_stats"][0]["name"] == "add_sub")

# Bad requests: same kind of refusal as Triton (an error), with infergate's codes.
for proto, mod, url in [("grpc", grpcclient, GATE_GRPC), ("http", httpclient, GATE_HTTP)]:
    c = mod.InferenceServerClient(url)
    bad = [
        ("unknown model", "nope", {"INPUT0": np.zeros((1, 16), np.float32)}, ("StatusCode.NOT_FOUND", "404")),
        ("wrong shape", "add_sub", {"INPUT0": np.zeros((1, 15), np.float32), "INPUT1": np.zeros((1, 15), np.float32)}, ("StatusCode.INVALID_ARGUMENT", "400")),
        ("wrong dtype", "add_sub", {"INPUT0": np.zeros((1, 16), np.float64), "INPUT1": np.zeros((1, 16), np.float64)}, ("StatusCode.INVALID_ARGUMENT", "400")),
        ("missing input", "add_sub", {"INPUT0": np.zeros((1, 16), np.float32)}, ("StatusCode.INVALID_ARGUMENT", "400")),
    ]
    for what, model, inputs, codes in bad:
        try:
            ins = []
            for name, arr in inputs.items():
                t = mod.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
                t.set_data_from_numpy(arr)
                ins.append(t)
            c.infer(model, ins)
            check(f"{proto} {what} refused", False, "no error")
        except InferenceServerException as e:
            status = str(e.status())
            check(f"{proto} {what} refused with {codes}", status in codes, f"status={status} msg={e.message()}")

print(f"{results['passed']} passed, {results['failed']} failed")
sys.exit(1 if results["failed"] else 0)
