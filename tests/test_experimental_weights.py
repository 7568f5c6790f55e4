"""minray.experimental.TorchWeights: a PyTorch module's weights as numpy arrays.

Round trips through get_weights/set_weights and get_flat/set_flat, the errors
for wrong keys and shapes, and weights sent through the object store to a task
in another process that loads them into a fresh module.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import minray
from minray.experimental import TorchWeights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_net(seed):
    """A small CNN with a batch-norm layer, so the state_dict holds buffers too."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 10),
    )


def train_a_little(net):
    """A forward pass in training mode (moves the batch-norm buffers) and an SGD step."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    loss = net(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def inputs():
    return torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(7))


def outputs(net):
    net.eval()
    with torch.no_grad():
        return net(inputs()).numpy()


def test_importing_minray_does_not_import_torch():
    code = ("import sys, minray, minray.experimental\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_get_weights_is_a_dict_of_numpy_copies_including_buffers():
    net = make_net(0)
    weights = TorchWeights(net).get_weights()
    assert list(weights) == list(net.state_dict())
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(weights)
    for key, value in net.state_dict().items():
        assert isinstance(weights[key], np.ndarray)
        assert weights[key].shape == tuple(value.shape)
        np.testing.assert_array_equal(weights[key], value.numpy())
    # Copies: changing the module later does not change what was returned.
    before = weights["0.weight"].copy()
    train_a_little(net)
    np.testing.assert_array_equal(weights["0.weight"], before)
    assert not np.array_equal(TorchWeights(net).get_weights()["0.weight"], before)


def test_set_weights_round_trip_gives_identical_outputs():
    source, target = make_net(0), make_net(1)
    train_a_little(source)                            # buffers and weights move
    assert not np.allclose(outputs(source), outputs(target))
    weights = TorchWeights(source).get_weights()
    TorchWeights(target).set_weights(weights)
    np.testing.assert_array_equal(outputs(target), outputs(source))
    for key, value in TorchWeights(target).get_weights().items():
        np.testing.assert_array_equal(value, weights[key])
        assert value.dtype == weights[key].dtype      # num_batches_tracked stays int64
    # Later changes to the dict do not reach the module.
    weights["4.bias"][:] = 100.0
    assert not np.any(TorchWeights(target).get_weights()["4.bias"] == 100.0)


def test_set_weights_errors_name_the_key_and_change_nothing():
    net = make_net(0)
    tw = TorchWeights(net)
    good = tw.get_weights()

    missing = dict(good)
    del missing["4.bias"]
    with pytest.raises(KeyError, match=r"missing keys: 4\.bias"):
        tw.set_weights(missing)

    extra = dict(good, **{"5.weight": np.zeros(3)})
    with pytest.raises(KeyError, match=r"unexpected keys: 5\.weight"):
        tw.set_weights(extra)

    wrong = dict(good)
    wrong["0.weight"] = np.zeros_like(good["0.weight"])        # valid, would change the net
    wrong["4.weight"] = np.zeros((10, 3))
    with pytest.raises(ValueError, match=r"'4\.weight' has shape \(10, 3\).*\(10, 256\)"):
        tw.set_weights(wrong)
    np.testing.assert_array_equal(tw.get_weights()["0.weight"], good["0.weight"])

    with pytest.raises(TypeError):
        tw.set_weights([good])
    with pytest.raises(TypeError):
        TorchWeights(np.zeros(3))


def test_flat_round_trip():
    source, target = make_net(0), make_net(1)
    train_a_little(source)
    flat = TorchWeights(source).get_flat()
    assert flat.dtype == np.float32 and flat.ndim == 1
    params = sum(p.numel() for p in source.parameters())
    # Parameters plus the float buffers (running mean and var); num_batches_tracked is an int.
    assert flat.shape[0] == params + 2 * 4 == TorchWeights(source).flat_size()
    TorchWeights(target).set_flat(flat)
    np.testing.assert_array_equal(TorchWeights(target).get_flat(), flat)
    np.testing.assert_array_equal(outputs(target), outputs(source))

    # A vector of the right size sets exactly those values, in state_dict order.
    tw = TorchWeights(make_net(2))
    tw.set_flat(np.arange(flat.shape[0], dtype=np.float64))
    np.testing.assert_array_equal(tw.get_flat(), np.arange(flat.shape[0], dtype=np.float32))
    first = tw.get_weights()["0.weight"]
    np.testing.assert_array_equal(first.ravel(), np.arange(first.size))

    with pytest.raises(ValueError, match=f"{flat.shape[0] - 1} elements.*{flat.shape[0]}"):
        tw.set_flat(flat[:-1])
    with pytest.raises(ValueError, match="1-D"):
        tw.set_flat(flat.reshape(1, -1))


@minray.remote
def outputs_in_a_task(weights, seed):
    """In a worker process: a fresh net (other seed) loaded with `weights`, its outputs."""
    net = make_net(seed)
    TorchWeights(net).set_weights(weights)
    return os.getpid(), outputs(net), TorchWeights(net).get_flat()


def test_weights_through_the_object_store_load_in_another_process():
    source = make_net(0)
    train_a_little(source)
    minray.init(num_cpus=1)
    try:
        ref = minray.put(TorchWeights(source).get_weights())
        pid, out, flat = minray.get(outputs_in_a_task.remote(ref, 5), timeout=120)
    finally:
        minray.shutdown()
    assert pid != os.getpid()
    np.testing.assert_array_equal(out, outputs(source))
    np.testing.assert_array_equal(flat, TorchWeights(source).get_flat())
