"""Lists the gRPC services of a server through server reflection, as grpcurl does.

Usage: reflection.py HOST:PORT  — prints one service name per line.
"""
import sys

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(sys.argv[1]))
for name in db.get_services():
    print(name)
# Resolving a method's input type proves the descriptors themselves are served.
desc = db.FindFileContainingSymbol("inference.GRPCInferenceService")
print("resolved:", desc.name)
