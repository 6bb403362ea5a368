"""The linear probe: logistic regression on frozen image features, C searched as CoOp does."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .base import Fitting, Method, MethodSetup
from .common import as_features, as_labels, check_positive_int, check_positive_number


@dataclasses.dataclass(frozen=True)
class LinearProbeConfig:
    """CoOp's linear-probe protocol (``lpclip/linear_probe.py`` of KaiyangZhou/CoOp): scikit-learn's
    ``LogisticRegression`` (lbfgs, L2 penalty, ``max_iter=1000``); its inverse regularization
    strength C is searched on held-out features, first over ``coarse_grid`` (powers of 10 from
    1e6 down to 1e-6), then by ``search_steps`` = 8 rounds of its binary search in log10 C
    (``num_step`` 8). ``C``: a fixed value instead of the search. ``normalize``: L2-normalize
    the features first (CoOp's feature extractor stores raw features; normalized features make
    the C grid mean the same for every backbone)."""

    coarse_grid: tuple[float, ...] = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)
    search_steps: int = 8
    max_iter: int = 1000
    normalize: bool = True
    C: float | None = None  # scikit-learn's name

    def __post_init__(self):
        if not self.coarse_grid:
            raise ValueError("coarse_grid must hold at least one value of C")
        for value in self.coarse_grid:
            check_positive_number("coarse_grid values", value)
        check_positive_int("search_steps", self.search_steps)
        check_positive_int("max_iter", self.max_iter)
        if self.C is not None:
            check_positive_number("C", self.C)


class LinearProbe:
    """Logistic regression on frozen image features with C chosen as CoOp's linear probe does.

    ``fit(train_features, train_labels, val_features, val_labels)``: for each C of the coarse
    grid, fit on the training features and score on the held-out ones; the best (first on ties)
    C_peak opens the interval [C_peak / 10, C_peak * 10]; each of the ``search_steps`` rounds
    fits both ends, keeps the better (the right one only if strictly better) as the current
    classifier and halves the interval in log10 C towards it. The classifier of the last round
    is the result (CoOp reports that one, not the best round). The classifier is fitted on the
    training features only; the held-out features serve the search alone (CoOp's protocol).

    ``logits(features)``: (N, num_classes) float32, scikit-learn's decision function
    ``x @ coef.T + intercept``; a class absent from the training labels gets -inf; with two
    classes present, the first gets 0 and the second the binary decision value (the same
    softmax as scikit-learn's ``predict_proba``). ``state_dict()``: ``coef`` (K, D),
    ``intercept`` (K,), ``classes`` (the K trained labels), ``C``, ``num_classes``, ``normalize``
    and ``search`` (rows of [C, held-out accuracy in %] in the order tried).
    """

    def __init__(self, num_classes: int, **options):
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.config = LinearProbeConfig(**options)
        self.C: float | None = None
        self.coef: torch.Tensor | None = None
        self.intercept: torch.Tensor | None = None
        self.classes: torch.Tensor | None = None
        self.search: list[tuple[float, float]] = []

    def _prepare(self, name: str, features, dim: int | None = None) -> np.ndarray:
        features = as_features(name, features, dim)
        if self.config.normalize:
            features = F.normalize(features, dim=-1)
        return features.detach().cpu().double().numpy()

    def _classifier(self, C: float, features: np.ndarray, labels: np.ndarray):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        with warnings.catch_warnings():
            # Extreme C (1e6) can stop at max_iter, as in CoOp's runs; the search judges it.
            warnings.simplefilter("ignore", ConvergenceWarning)
            return LogisticRegression(C=C, max_iter=self.config.max_iter).fit(features, labels)

    def fit(self, train_features, train_labels, val_features=None, val_labels=None) -> LinearProbe:
        """train_features (N, D), train_labels (N,); val_features (M, D), val_labels (M,) for
        the search of C (not needed with a fixed ``C``). Raw CLIP features; returns self."""
        train = self._prepare("train_features", train_features)
        labels = as_labels("train_labels", train_labels, train.shape[0], self.num_classes)
        labels = labels.cpu().numpy()
        if len(np.unique(labels)) < 2:
            raise ValueError("train_labels must hold at least two classes to fit a classifier")
        self.search = []
        if self.config.C is not None:
            chosen, classifier = self.config.C, self._classifier(self.config.C, train, labels)
        else:
            if val_features is None or val_labels is None:
                raise ValueError(
                    "val_features and val_labels are needed for the search of C; pass held-out "
                    "features, or C=... to fix it"
                )
            held_out = self._prepare("val_features", val_features, train.shape[1])
            held_out_labels = (
                as_labels("val_labels", val_labels, held_out.shape[0], self.num_classes)
                .cpu()
                .numpy()
            )
            chosen, classifier = self._search(train, labels, held_out, held_out_labels)
        self.C = float(chosen)
        coef, intercept = classifier.coef_, classifier.intercept_
        self.coef = torch.from_numpy(coef.copy())
        self.intercept = torch.from_numpy(intercept.copy())
        self.classes = torch.from_numpy(classifier.classes_.astype(np.int64))
        return self

    def _search(self, train, labels, held_out, held_out_labels):
        """CoOp's search: (C, classifier) of the last binary-search round."""
        fitted: dict[float, tuple] = {}

        def score(C: float):
            if C not in fitted:
                classifier = self._classifier(C, train, labels)
                accuracy = float(np.mean(classifier.predict(held_out) == held_out_labels))
                fitted[C] = (classifier, accuracy)
                self.search.append((C, 100.0 * accuracy))
            return fitted[C]

        accuracies = [score(C)[1] for C in self.config.coarse_grid]
        peak = self.config.coarse_grid[int(np.argmax(accuracies))]
        left, right = 0.1 * peak, 10.0 * peak
        chosen = None
        for _ in range(self.config.search_steps):
            (left_classifier, left_accuracy), (right_classifier, right_accuracy) = (
                score(left),
                score(right),
            )
            log_left, log_right = np.log10(left), np.log10(right)
            if left_accuracy < right_accuracy:
                chosen = (right, right_classifier)
                log_left = 0.5 * (log_right + log_left)
            else:
                chosen = (left, left_classifier)
                log_right = 0.5 * (log_right + log_left)
            left, right = float(np.power(10, log_left)), float(np.power(10, log_right))
        return chosen

    def logits(self, features) -> torch.Tensor:
        """(N, num_classes) float32 decision values of raw CLIP features (N, D), on their
        device."""
        if self.coef is None:
            raise RuntimeError("LinearProbe.logits before fit: no classifier")
        device = torch.as_tensor(features).device
        x = torch.from_numpy(self._prepare("features", features, self.coef.shape[1]))
        scores = x @ self.coef.t() + self.intercept  # (N, K), or (N, 1) for two classes
        if self.classes.numel() == 2:
            scores = torch.cat([torch.zeros_like(scores), scores], dim=1)
        logits = torch.full((x.shape[0], self.num_classes), -math.inf, dtype=torch.float64)
        logits[:, self.classes] = scores
        return logits.float().to(device)

    def state_dict(self) -> dict:
        if self.coef is None:
            raise RuntimeError("LinearProbe.state_dict before fit: nothing to save")
        return {
            "coef": self.coef.clone(),
            "intercept": self.intercept.clone(),
            "classes": self.classes.clone(),
            "C": self.C,
            "num_classes": self.num_classes,
            "normalize": self.config.normalize,
            "search": torch.tensor(self.search, dtype=torch.float64).reshape(-1, 2),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores what ``state_dict`` returned; the class count must match."""
        expected = {"coef", "intercept", "classes", "C", "num_classes", "normalize", "search"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state must be a LinearProbe.state_dict(), got keys {got}")
        if state["num_classes"] != self.num_classes:
            raise ValueError(
                f"state is for {state['num_classes']} classes, this probe has {self.num_classes}"
            )
        if bool(state["normalize"]) != self.config.normalize:
            raise ValueError(
                f"state was fitted with normalize={state['normalize']}, this probe has "
                f"normalize={self.config.normalize}"
            )
        self.coef = state["coef"].double()
        self.intercept = state["intercept"].double()
        self.classes = state["classes"].long()
        self.C = float(state["C"])
        self.search = [(float(c), float(a)) for c, a in state["search"].tolist()]


def _build(setup: MethodSetup) -> LinearProbe:
    options = dict(setup.options, coarse_grid=tuple(setup.options["coarse_grid"]))
    return LinearProbe(len(setup.classnames), **options)


FITTING = Fitting("shots", lambda probe: {"C": probe.C}, learned="a classifier per class")
METHOD = Method("linear-probe", "linear probe", _build, LinearProbeConfig, fitting=FITTING)
