"""Checks the ghz configs in this folder without ghz: compiles the protos they name, parses
each config's `data` into the request type of its `call` (as ghz would, protobuf JSON), and
sends it to a running infergate over gRPC, expecting OK.

    python loadtest/ghz/check.py HOST:PORT
"""
import glob
import importlib
import json
import os
import sys
import tempfile

import grpc
from google.protobuf import json_format
from grpc_tools import protoc

here = os.path.dirname(os.path.abspath(__file__))
target = sys.argv[1]
out = tempfile.mkdtemp()
protos = os.path.join(here, "..", "..", "proto")
for p in ("model_config.proto", "grpc_service.proto", "tasks.proto"):
    if protoc.main(["protoc", f"-I{protos}", f"--python_out={out}", f"--grpc_python_out={out}", p]):
        sys.exit(f"protoc failed on {p}")
sys.path.insert(0, out)
modules = {
    "inference.GRPCInferenceService": ("grpc_service_pb2", "grpc_service_pb2_grpc", "GRPCInferenceServiceStub"),
    "infergate.tasks.v1.TaskService": ("tasks_pb2", "tasks_pb2_grpc", "TaskServiceStub"),
}
channel = grpc.insecure_channel(target)
checked = 0
for path in sorted(glob.glob(os.path.join(here, "*.json"))):
    cfg = json.load(open(path))
    name = os.path.basename(path)
    for key in ("proto", "call", "data", "host"):
        assert key in cfg, f"{name}: no {key}"
    assert os.path.exists(os.path.join(here, cfg["proto"])), f"{name}: proto {cfg['proto']} missing"
    service, method = cfg["call"].split("/")
    pb2, pb2_grpc, stub_name = (importlib.import_module(m) if i < 2 else m
                                for i, m in enumerate(modules[service]))
    stub = getattr(pb2_grpc, stub_name)(channel)
    rpc = getattr(stub, method)
    desc = pb2.DESCRIPTOR.services_by_name[service.split(".")[-1]].methods_by_name[method]
    msg_class = getattr(importlib.import_module(desc.input_type.file.name.replace(".proto", "_pb2")),
                        desc.input_type.name)
    msg = json_format.ParseDict(cfg["data"], msg_class())
    reply = rpc(msg, timeout=10)
    print(f"{name}: {cfg['call']} -> OK ({type(reply).__name__})")
    checked += 1
assert checked >= 3, checked
print(f"{checked} ghz configs parse and run against {target}")
