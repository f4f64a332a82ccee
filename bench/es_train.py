"""The early-stopping benchmark's train.py: an MLP on bundled scikit-learn data, one step per epoch.

    python bench/es_train.py --task digits --learning_rate=0.001 ... --saved_params_dir=/tmp/m

Tasks (``--task``): ``digits`` (8x8 digit images, 10 classes; the examples/digits MLP) and
``breast_cancer`` (30 features, 2 classes), both bundled with scikit-learn (no download).
Each step (``PASSES`` epochs) it reports the validation accuracy with ``report_intermediate`` and stops when
``should_stop()`` says so; at the end it reports the last epoch's accuracy. ``train_epochs``
is what the Optuna reference in ``bench/early_stopping.py`` runs in process.
"""

from __future__ import annotations

import argparse
import warnings

EPOCHS = {"digits": 20, "breast_cancer": 20}  # steps reported
PASSES = {"digits": 8, "breast_cancer": 30}  # passes over the training data per step, so that training,
# not the process start-up (Python and scikit-learn imports, 1-3 s), is most of a trial's time


def load(task: str):
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = (load_digits if task == "digits" else load_breast_cancer)(return_X_y=True)
    X_train, X_val, y_train, y_val = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    scaler = StandardScaler().fit(X_train)
    return scaler.transform(X_train), scaler.transform(X_val), y_train, y_val


def train_epochs(task: str, params: dict, data=None):
    """Yield (step, validation accuracy) for steps 1..EPOCHS[task], each PASSES[task] epochs."""
    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    X_train, X_val, y_train, y_val = data or load(task)
    model = MLPClassifier(hidden_layer_sizes=(int(params["hidden_size"]),),
                          learning_rate_init=params["learning_rate"], alpha=params["alpha"],
                          batch_size=int(params["batch_size"]), max_iter=1, warm_start=True, random_state=0)
    classes = np.unique(y_train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X_train, y_train)
        for step in range(1, EPOCHS[task] + 1):
            for _ in range(PASSES[task] - (step == 1)):
                model.partial_fit(X_train, y_train, classes=classes)
            yield step, float(model.score(X_val, y_val))


def main() -> None:
    from autofinetune import report_final_result, report_intermediate, should_stop

    parser = argparse.ArgumentParser()
    for name, kind in (("learning_rate", float), ("alpha", float), ("hidden_size", int), ("batch_size", int)):
        parser.add_argument(f"--{name}", type=kind, required=True)
    parser.add_argument("--task", choices=sorted(EPOCHS), default="digits")
    parser.add_argument("--saved_params_dir", required=True)
    args = parser.parse_args()
    accuracy = 0.0
    for epoch, accuracy in train_epochs(args.task, vars(args)):
        report_intermediate(accuracy, epoch)
        if should_stop():
            return
    report_final_result(accuracy)


if __name__ == "__main__":
    main()
