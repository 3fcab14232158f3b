"""advex: a gRPC model-robustness service (Ilyas et al., NeurIPS 2019).

Layers: ``advex.client`` (SDK + CLI, no torch), ``advex.service`` (gRPC server),
``advex.engine`` (pure PyTorch), ``advex.v1`` (generated protocol code).
"""

__version__ = "0.1.0"
