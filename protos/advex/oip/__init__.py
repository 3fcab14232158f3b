"""The Open Inference Protocol (KServe v2) gRPC API that advex calls as a client.

`open_inference_pb2` / `open_inference_pb2_grpc` are generated from open_inference.proto by
scripts/gen_protos.py (proto package `inference`, as on the wire).
"""
