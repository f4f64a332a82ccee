"""Population-Based example: an MLP on scikit-learn's digits that continues training.

Round 0 trains from scratch. Later rounds get --model_path=<parent checkpoint>: the
model is restored from there, with its Adam optimizer state, its new hyperparameters
are applied, and it trains --epochs more epochs (autofinetune passes --epochs=1 unless
told otherwise), so validation accuracy climbs across rounds. The checkpoint is saved
to --saved_params_dir; the parent's directory is only read, never written.

    python -m flows.autofinetune examples/digits_pbt/train.py \\
        --param-file examples/digits_pbt/hparam.yaml --evaluator populationbased
"""

import argparse
import os
import pickle

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

from autofinetune import report_final_result

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--learning_rate", type=float, default=0.001)
parser.add_argument("--alpha", type=float, default=0.0001, help="L2 penalty")
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--saved_params_dir", default="saved_params")
parser.add_argument("--model_path", default=None, help="checkpoint to continue from")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

X, y = load_digits(return_X_y=True)
X_train, X_val, y_train, y_val = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
scaler = StandardScaler().fit(X_train)
X_train, X_val = scaler.transform(X_train), scaler.transform(X_val)
classes = np.unique(y)

if args.model_path:
    with open(os.path.join(args.model_path, "checkpoint.pkl"), "rb") as f:
        checkpoint = pickle.load(f)
    model, epochs_done = checkpoint["model"], checkpoint["epochs_done"]
    model.set_params(alpha=args.alpha, batch_size=args.batch_size)
    model._optimizer.learning_rate = args.learning_rate  # keep Adam's moments, new step size
    print(f"restored {args.model_path} after {epochs_done} epochs")
else:
    model = MLPClassifier(hidden_layer_sizes=(32,), learning_rate_init=args.learning_rate,
                          alpha=args.alpha, batch_size=args.batch_size, random_state=args.seed)
    epochs_done = 0

rng = np.random.default_rng(args.seed + epochs_done)
for _ in range(args.epochs):
    order = rng.permutation(len(X_train))
    model.partial_fit(X_train[order], y_train[order], classes=classes)
    epochs_done += 1
accuracy = model.score(X_val, y_val)
print(f"epochs_done={epochs_done} validation accuracy={accuracy:.4f}")

os.makedirs(args.saved_params_dir, exist_ok=True)
with open(os.path.join(args.saved_params_dir, "checkpoint.pkl"), "wb") as f:
    pickle.dump({"model": model, "epochs_done": epochs_done, "args": vars(args)}, f)
report_final_result(accuracy)
