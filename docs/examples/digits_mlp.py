"""The model both hyperparameter-search examples train: a small numpy network.

One hidden ReLU layer, a softmax output, minibatch SGD with L2, on
scikit-learn's bundled 8x8 digits. It lives in its own module beside the
scripts: minray puts the driver script's directory on its workers' path, so
the tasks import it there too.
"""
import numpy as np


def load_digits_split(seed=0, validation=0.25):
    """scikit-learn's digits, pixels scaled to [0, 1], shuffled and split."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float64)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    split = int(round(len(y) * (1 - validation)))
    return {"x_train": x[:split], "y_train": y[:split],
            "x_val": x[split:], "y_val": y[split:], "classes": 10}


def init_network(rng, inputs, hidden, outputs):
    """He-initialised weights of a one-hidden-layer network, as a dict of arrays."""
    return {"w1": rng.normal(0.0, np.sqrt(2.0 / inputs), (inputs, hidden)),
            "b1": np.zeros(hidden),
            "w2": rng.normal(0.0, np.sqrt(2.0 / hidden), (hidden, outputs)),
            "b2": np.zeros(outputs)}


def forward(net, x):
    h = np.maximum(x @ net["w1"] + net["b1"], 0.0)
    return h, h @ net["w2"] + net["b2"]


def sgd(net, data, params, steps, rng):
    """`steps` minibatch SGD steps on softmax cross-entropy + L2; returns the mean loss."""
    x, y = data["x_train"], data["y_train"]
    lr, l2, batch = params["lr"], params["l2"], params["batch_size"]
    total = 0.0
    for _ in range(steps):
        idx = rng.integers(0, len(y), batch)
        xb, yb = x[idx], y[idx]
        h, logits = forward(net, xb)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        total += float(-np.mean(np.log(p[np.arange(batch), yb] + 1e-12)))
        d_logits = p
        d_logits[np.arange(batch), yb] -= 1.0
        d_logits /= batch
        d_h = (d_logits @ net["w2"].T) * (h > 0)
        net["w2"] -= lr * (h.T @ d_logits + l2 * net["w2"])
        net["b2"] -= lr * d_logits.sum(axis=0)
        net["w1"] -= lr * (xb.T @ d_h + l2 * net["w1"])
        net["b1"] -= lr * d_h.sum(axis=0)
    return total / max(steps, 1)


def accuracy(net, x, y):
    _, logits = forward(net, x)
    return float(np.mean(np.argmax(logits, axis=1) == y))


def random_params(rng):
    """The search space: log-uniform learning rate and L2, hidden size, batch size."""
    return {"lr": float(10 ** rng.uniform(-3.0, 0.0)),
            "hidden": int(rng.choice([8, 16, 32, 64, 128])),
            "l2": float(10 ** rng.uniform(-6.0, -1.0)),
            "batch_size": int(rng.choice([8, 16, 32, 64, 128]))}


def describe(params):
    return (f"lr={params['lr']:.4f} hidden={params['hidden']:3d} "
            f"l2={params['l2']:.1e} batch={params['batch_size']:3d}")


def check_best(acc, bound):
    """Print the verdict on the best accuracy; exit 1 if it is below bound."""
    if acc < bound:
        print(f"FAILED: best accuracy {acc:.4f} is below {bound}")
        raise SystemExit(1)
    print(f"OK: best accuracy is at least {bound}")
