"""Fine-tune a small MLP on scikit-learn's bundled digits data: an autofinetune example.

The train.py contract: every searched hyperparameter arrives as --<name>=<value>, the
model is saved to --saved_params_dir, and the validation accuracy is reported once, at
the end, with report_final_result (higher is better). Optionally (for --early-stop), it
reports the validation accuracy after every epoch with report_intermediate and stops when
should_stop() says the search gave up on it; a script without these runs the same way.

    python examples/digits/train.py --learning_rate=0.001 --saved_params_dir=/tmp/m
"""

import argparse
import os
import pickle

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

from autofinetune import report_final_result, report_intermediate, should_stop

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--learning_rate", type=float, default=0.001)
parser.add_argument("--alpha", type=float, default=0.0001, help="L2 penalty")
parser.add_argument("--hidden_size", type=int, default=64)
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=15)
parser.add_argument("--saved_params_dir", default="saved_params")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

X, y = load_digits(return_X_y=True)
X_train, X_val, y_train, y_val = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
scaler = StandardScaler().fit(X_train)
model = MLPClassifier(hidden_layer_sizes=(args.hidden_size,), learning_rate_init=args.learning_rate,
                      alpha=args.alpha, batch_size=args.batch_size, random_state=args.seed)
X_train, X_val = scaler.transform(X_train), scaler.transform(X_val)
for epoch in range(1, args.epochs + 1):
    model.partial_fit(X_train, y_train, classes=np.unique(y))  # one epoch
    report_intermediate(model.score(X_val, y_val), epoch)
    if should_stop():  # the search stopped this trial early: no need to finish
        break
accuracy = model.score(X_val, y_val)
print(f"epochs={epoch} validation accuracy={accuracy:.4f}")

os.makedirs(args.saved_params_dir, exist_ok=True)
with open(os.path.join(args.saved_params_dir, "model.pkl"), "wb") as f:
    pickle.dump({"scaler": scaler, "model": model, "args": vars(args)}, f)
report_final_result(accuracy)
