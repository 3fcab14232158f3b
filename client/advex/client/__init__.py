"""advex.client: the Python SDK and CLI. Needs grpcio, protobuf, numpy (and tqdm); never torch.

    from advex.client import Client
    c = Client("localhost:50051")
    op = c.train("small_cnn", "fashion-mnist", preset="quick")
    model_id = op.result().model_id

AsyncClient has the same methods as coroutines (grpc.aio). Results show themselves in a notebook
(tables, `to_pandas()`, `.plot()`): see advex.client.results.
"""
from advex.client.results import (AttackResult, Audit, AuditHistory, DatasetBuild, Evaluation, Export, Training,
                                  Transfer)
from advex.client.sdk import AsyncClient, AsyncOperation, Client, Operation, OperationError

__all__ = ["Client", "AsyncClient", "Operation", "AsyncOperation", "OperationError", "AttackResult", "Evaluation",
           "Transfer", "DatasetBuild", "Training", "Export", "Audit", "AuditHistory"]
