"""Get and set a PyTorch module's weights as numpy arrays.

    weights = TorchWeights(model)
    ref = minray.put(weights.get_weights())       # dict: state_dict key -> np.ndarray
    ...
    TorchWeights(other_model).set_weights(minray.get(ref))

`get_weights`/`set_weights` cover the whole `state_dict`, buffers included
(e.g. batch-norm running statistics). `get_flat`/`set_flat` pack the floating-
point entries into one float32 vector, in `state_dict` order, as the original's
`TensorFlowVariables.get_flat`/`set_flat` did; integer buffers (such as
batch-norm's `num_batches_tracked`) are left out of the vector.
"""
import numpy as np


class TorchWeights:
    """A view of `module`'s weights (parameters and buffers) as numpy arrays."""

    def __init__(self, module):
        import torch
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"TorchWeights needs a torch.nn.Module, not {type(module).__name__}")
        self.module = module

    def _state(self):
        return self.module.state_dict(keep_vars=False)

    def keys(self):
        """The names of the weights, in `state_dict` order."""
        return list(self._state().keys())

    def get_weights(self):
        """A dict of copies of every `state_dict` entry, as numpy arrays on the CPU."""
        return {key: value.detach().cpu().numpy().copy() for key, value in self._state().items()}

    def set_weights(self, weights):
        """Load a dict like `get_weights()` returns (all keys, same shapes) into the module."""
        import torch
        if not isinstance(weights, dict):
            raise TypeError(f"set_weights needs a dict of arrays, not {type(weights).__name__}")
        state = self._state()
        missing = [key for key in state if key not in weights]
        unexpected = [key for key in weights if key not in state]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys: {', '.join(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {', '.join(map(str, unexpected))}")
            raise KeyError("set_weights: " + "; ".join(parts))
        # Check every shape before changing anything.
        for key, target in state.items():
            value = np.asarray(weights[key])
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"set_weights: {key!r} has shape {tuple(value.shape)}, "
                                 f"the module expects {tuple(target.shape)}")
        with torch.no_grad():
            for key, target in state.items():
                # np.array copies: values from the object store are read-only views.
                target.copy_(torch.from_numpy(np.array(weights[key])).to(target.dtype))

    def _float_entries(self):
        return [(key, value) for key, value in self._state().items()
                if value.is_floating_point()]

    def flat_size(self):
        """The length of the vector `get_flat` returns."""
        return sum(value.numel() for _, value in self._float_entries())

    def get_flat(self):
        """Every floating-point weight, concatenated into one float32 numpy vector."""
        entries = self._float_entries()
        if not entries:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate([value.detach().cpu().numpy().astype(np.float32).ravel()
                               for _, value in entries])

    def set_flat(self, vector):
        """Load a vector like `get_flat()` returns (same length) into the module."""
        import torch
        vector = np.asarray(vector)
        if vector.ndim != 1:
            raise ValueError(f"set_flat needs a 1-D vector, got shape {vector.shape}")
        entries = self._float_entries()
        size = sum(value.numel() for _, value in entries)
        if vector.shape[0] != size:
            raise ValueError(f"set_flat: vector has {vector.shape[0]} elements, "
                             f"the module's floating-point weights have {size}")
        offset = 0
        with torch.no_grad():
            for _, target in entries:
                n = target.numel()
                piece = vector[offset:offset + n].reshape(tuple(target.shape))
                target.copy_(torch.from_numpy(np.array(piece)).to(target.dtype))
                offset += n
