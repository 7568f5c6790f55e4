"""Helpers beyond Ray's core API, as in the original's `ray.experimental`.

`TorchWeights` gets and sets a PyTorch module's weights as a dict of numpy
arrays (what the original's `TensorFlowVariables` did for TensorFlow). torch
is imported only when a `TorchWeights` is used, so importing this package (and
minray itself) does not import torch.
"""

__all__ = ["TorchWeights"]


def __getattr__(name):
    if name == "TorchWeights":
        from minray.experimental.torch_weights import TorchWeights
        return TorchWeights
    raise AttributeError(f"module 'minray.experimental' has no attribute {name!r}")
