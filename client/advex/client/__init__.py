"""advex.client: the Python SDK and CLI. Needs grpcio, protobuf, numpy (and tqdm); never torch.

    from advex.client import Client
    c = Client("localhost:50051")
    op = c.train("small_cnn", "fashion-mnist", preset="quick")
    model_id = op.result().model_id
"""
from advex.client.sdk import AttackResult, Client, Operation, OperationError

__all__ = ["Client", "Operation", "OperationError", "AttackResult"]
