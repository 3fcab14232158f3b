"""advex.service: the gRPC server around the engine (validation, auth, metrics, operation
store, model/dataset registry, bounded workers)."""
