"""The early-stopping benchmark's train.py: a one-hidden-layer MLP in numpy, one step per PASSES epochs.

    python bench/es_train.py --task digits --data digits.npz --learning_rate=0.001 ... --saved_params_dir=/tmp/m

Tasks (``--task``): ``digits`` (8x8 digit images, 10 classes; the examples/digits task) and
``breast_cancer`` (30 features, 2 classes), both bundled with scikit-learn (no download).
Each step (``PASSES`` epochs) it reports the validation accuracy with ``report_intermediate``
and stops when ``should_stop()`` says so; at the end it reports the last step's accuracy.
``train_epochs`` is what the Optuna reference in ``bench/early_stopping.py`` runs in process.

The model is numpy only (ReLU, softmax, L2 ``alpha``, Adam as in scikit-learn's
MLPClassifier) and ``--data`` names the split prepared once by ``save_data``, so that a trial
spends its time training, as a real fine-tuning job does: importing scikit-learn costs 1-7 s
per process on a 2-core machine, which early stopping cannot save and which would otherwise
be most of a trial's time.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# One trial per CPU slot: BLAS threads of two trials on two cores only contend (the tiny
# matrices gain nothing from them). Set before numpy loads its BLAS.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402

EPOCHS = {"digits": 20, "breast_cancer": 20}  # steps reported
PASSES = {"digits": 24, "breast_cancer": 80}  # passes over the training data per step


def load(task: str):
    """(X_train, X_val, y_train, y_val): a stratified 70/30 split, standardized on the training part."""
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = (load_digits if task == "digits" else load_breast_cancer)(return_X_y=True)
    X_train, X_val, y_train, y_val = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    scaler = StandardScaler().fit(X_train)
    return scaler.transform(X_train), scaler.transform(X_val), y_train, y_val


def save_data(task: str, path: Path) -> tuple:
    """Write ``load(task)`` to ``path`` (.npz) for ``--data``; the arrays."""
    data = load(task)
    np.savez(path, X_train=data[0], X_val=data[1], y_train=data[2], y_val=data[3])
    return data


def read_data(path: str) -> tuple:
    with np.load(path) as f:
        return f["X_train"], f["X_val"], f["y_train"], f["y_val"]


def train_epochs(task: str, params: dict, data=None):
    """Yield (step, validation accuracy) for steps 1..EPOCHS[task], each PASSES[task] epochs of
    minibatch Adam (seeded: the same params give the same curve)."""
    X_train, X_val, y_train, y_val = data if data is not None else load(task)
    rng = np.random.default_rng(0)
    n, d = X_train.shape
    hidden, classes = int(params["hidden_size"]), int(max(y_train.max(), y_val.max())) + 1
    batch, lr, alpha = max(1, min(int(params["batch_size"]), n)), float(params["learning_rate"]), float(params["alpha"])
    Y = np.eye(classes)[y_train]

    def glorot(fan_in: int, fan_out: int) -> np.ndarray:
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, (fan_in, fan_out))

    weights = [glorot(d, hidden), np.zeros(hidden), glorot(hidden, classes), np.zeros(classes)]
    m = [np.zeros_like(w) for w in weights]
    v = [np.zeros_like(w) for w in weights]
    t = 0
    with np.errstate(all="ignore"):  # a diverging learning rate gives NaNs: a low accuracy, not a crash
        for step in range(1, EPOCHS[task] + 1):
            for _ in range(PASSES[task]):
                order = rng.permutation(n)
                for start in range(0, n, batch):
                    idx = order[start:start + batch]
                    x, y = X_train[idx], Y[idx]
                    W1, b1, W2, b2 = weights
                    h = np.maximum(x @ W1 + b1, 0.0)
                    z = h @ W2 + b2
                    p = np.exp(z - z.max(axis=1, keepdims=True))
                    p /= p.sum(axis=1, keepdims=True)
                    dz = (p - y) / len(idx)
                    dh = (dz @ W2.T) * (h > 0)
                    grads = [x.T @ dh + alpha * W1 / len(idx), dh.sum(axis=0),
                             h.T @ dz + alpha * W2 / len(idx), dz.sum(axis=0)]
                    t += 1
                    step_size = lr * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
                    for w, g, mw, vw in zip(weights, grads, m, v):
                        mw *= 0.9
                        mw += 0.1 * g
                        vw *= 0.999
                        vw += 0.001 * g * g
                        w -= step_size * mw / (np.sqrt(vw) + 1e-8)
            W1, b1, W2, b2 = weights
            predicted = (np.maximum(X_val @ W1 + b1, 0.0) @ W2 + b2).argmax(axis=1)
            yield step, float((predicted == y_val).mean())


def main() -> None:
    from autofinetune import report_final_result, report_intermediate, should_stop

    parser = argparse.ArgumentParser()
    for name, kind in (("learning_rate", float), ("alpha", float), ("hidden_size", int), ("batch_size", int)):
        parser.add_argument(f"--{name}", type=kind, required=True)
    parser.add_argument("--task", choices=sorted(EPOCHS), default="digits")
    parser.add_argument("--data", help="the .npz save_data wrote (default: split the data here, with scikit-learn)")
    parser.add_argument("--saved_params_dir", required=True)
    args = parser.parse_args()
    accuracy = 0.0
    for epoch, accuracy in train_epochs(args.task, vars(args), read_data(args.data) if args.data else None):
        report_intermediate(accuracy, epoch)
        if should_stop():
            return
    report_final_result(accuracy)


if __name__ == "__main__":
    main()
