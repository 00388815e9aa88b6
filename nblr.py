"""NB-LR, the n-gram component of the ensemble classifier (Wang & Manning 2012, with logistic regression).

A text is its binary bag of word uni+bigrams x in {0, 1}^V (lowercased; words with one inner
apostrophe, and `!` `?`, as baselines.py). For a binary task with labels y in {0, 1}, the
log-count ratio (Wang & Manning 2012, Eq. 2; smoothing alpha = 1)

    r = log((p / |p|_1) / (q / |q|_1)),   p = alpha + sum of x over y = 1,  q = alpha + sum over y = 0,

scales the features, and a logistic regression (L2, C = 1, liblinear) is fitted on x * r. Its
logit is z = w . (x * r) + b = (w * r) . x + b, so one weight vector W = w * r [V] and a bias b
are all inference needs. C > 2 classes: one such model per class against the rest (K = C
weight rows), their probabilities renormalised (scikit-learn's one-vs-rest rule):
p(c | x) = sigma(z_c) / sum_k sigma(z_k). Two classes: K = 1 row, p(1 | x) = sigma(z).

Saved beside the MDLM in its checkpoint folder, without pickle: ngram.json (format, classes,
hyper-parameters and the vocabulary, the n-grams in column order) and ngram.safetensors
("weight" float32 [K, V], "bias" float64 [K]); load checks every key and shape.

    model = NBLR.fit(texts, labels, classes)     # seconds to a minute (25,000 IMDB reviews: ~1 min)
    model.log_proba(texts)                       # float64 [N, C], log p(c | text), rows logsumexp to 0
    model.save(folder); NBLR.load(folder, classes)

scikit-learn builds the vocabulary, counts the n-grams and fits the regressions; scoring is a
sparse product with the saved arrays.
"""
import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from safetensors.numpy import load_file, save_file
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

from convert_hf import CheckpointError, atomic_write

CONFIG, WEIGHTS = "ngram.json", "ngram.safetensors"
FORMAT = 1  # ngram.json's "format": a file of another format is refused
TOKEN_PATTERN = r"(?u)\b\w+(?:'\w+)?\b|[!?]"  # words, words with an inner apostrophe, ! and ?
NGRAM_RANGE = (1, 2)
ALPHA = 1.0  # the log-count ratio's smoothing
C_REG = 1.0  # the logistic regression's inverse L2 strength (Wang & Manning's NBSVM uses C = 1 too)
HYPER = {"token_pattern": TOKEN_PATTERN, "ngram_range": list(NGRAM_RANGE), "alpha": ALPHA, "C": C_REG,
         "lowercase": True, "binary": True}


def prepare(texts: list[str]) -> list[str]:
    """IMDB's `<br />` line breaks become spaces (not the words "br"); other texts are unchanged."""
    return [t.replace("<br />", " ") for t in texts]


def log_count_ratio(X: sp.csr_matrix, positive: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """r = log((p / |p|_1) / (q / |q|_1)), p = alpha + the feature sums of the `positive` rows, q the
    same over the others (Wang & Manning 2012, Eq. 2). X [N, V] binary counts, positive bool [N] -> float64 [V]."""
    p = alpha + np.asarray(X[positive].sum(0)).ravel()
    q = alpha + np.asarray(X[~positive].sum(0)).ravel()
    return np.log(p / p.sum()) - np.log(q / q.sum())


class NBLR:
    """A fitted NB-LR: vocabulary (V n-grams, in column order), weight float32 [K, V] (W = w * r),
    bias float64 [K], classes (C names; K = 1 if C == 2 else C)."""

    def __init__(self, vocabulary: list[str], weight: np.ndarray, bias: np.ndarray, classes: list[str]):
        self.vocabulary, self.weight, self.bias, self.classes = vocabulary, weight, bias, list(classes)
        self.vectorizer = CountVectorizer(vocabulary={g: i for i, g in enumerate(vocabulary)}, binary=True,
                                          ngram_range=NGRAM_RANGE, token_pattern=TOKEN_PATTERN, dtype=np.float32)

    @classmethod
    def fit(cls, texts: list[str], labels, classes: list[str]) -> "NBLR":
        """Fit on N labeled texts: labels int [N] indexing `classes` (C >= 2 names). Raises ValueError
        for fewer than two classes present among the labels, or labels of another length."""
        labels = np.asarray(labels)
        if len(labels) != len(texts):
            raise ValueError(f"NB-LR: {len(labels)} labels for {len(texts)} texts")
        if len(np.unique(labels)) < 2:
            raise ValueError(f"NB-LR: the labeled texts hold {len(np.unique(labels))} class; it needs two or more")
        vectorizer = CountVectorizer(binary=True, ngram_range=NGRAM_RANGE, token_pattern=TOKEN_PATTERN,
                                     dtype=np.float32)
        X = vectorizer.fit_transform(prepare(texts)).tocsr()
        rows = [1] if len(classes) == 2 else range(len(classes))  # the positive class of each binary model
        weight, bias = np.zeros((len(rows), X.shape[1]), np.float32), np.zeros(len(rows))
        for k, c in enumerate(rows):
            positive = labels == c
            if positive.all() or not positive.any():  # a class without texts: never predicted
                weight[k], bias[k] = 0.0, -30.0
                continue
            r = log_count_ratio(X, positive)
            lr = LogisticRegression(solver="liblinear", C=C_REG).fit(X @ sp.diags(r), positive.astype(int))
            weight[k], bias[k] = lr.coef_[0] * r, lr.intercept_[0]
        vocabulary = [""] * X.shape[1]
        for gram, i in vectorizer.vocabulary_.items():
            vocabulary[i] = gram
        return cls(vocabulary, weight, bias, classes)

    def logits(self, texts: list[str]) -> np.ndarray:
        """z = W x + b of every binary model: float64 [N, K]."""
        X = self.vectorizer.transform(prepare(texts))
        return np.asarray(X @ self.weight.T, dtype=np.float64) + self.bias

    def log_proba(self, texts: list[str]) -> np.ndarray:
        """log p(c | text), float64 [N, C]: two classes, log sigma(-z) and log sigma(z); more, the
        one-vs-rest rule log sigma(z_c) - log sum_k sigma(z_k)."""
        z = self.logits(texts)
        if len(self.classes) == 2:
            return -np.logaddexp(0.0, np.concatenate([z, -z], 1))
        log_sigma = -np.logaddexp(0.0, -z)
        return log_sigma - np.logaddexp.reduce(log_sigma, axis=1, keepdims=True)

    def save(self, folder: str | Path) -> None:
        """ngram.json and ngram.safetensors into `folder`, each written whole or not at all."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"format": FORMAT, "model": "NB-LR", "classes": self.classes, **HYPER, "vocabulary": self.vocabulary}
        tensors = {"weight": np.ascontiguousarray(self.weight, np.float32), "bias": np.asarray(self.bias, np.float64)}
        atomic_write(folder / WEIGHTS, lambda p: save_file(tensors, p))
        atomic_write(folder / CONFIG, lambda p: Path(p).write_text(json.dumps(config)))

    @classmethod
    def load(cls, folder: str | Path, classes: list[str] | None = None) -> "NBLR | None":
        """The NB-LR saved in `folder`, or None if it holds none (no ngram.json and no ngram.safetensors).
        classes: the MDLM's class names, which the n-gram model's must equal. Raises CheckpointError
        naming the file and key for one file without the other, an unreadable file, another format or
        hyper-parameters, a missing or extra key, or shapes that do not match the vocabulary and classes."""
        config_path, weights_path = Path(folder, CONFIG), Path(folder, WEIGHTS)
        if not config_path.exists() and not weights_path.exists():
            return None
        for path in (config_path, weights_path):
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (the n-gram model is {CONFIG} and {WEIGHTS} together; "
                                      "retrain with train.py, or remove the other file)")
        try:
            config = json.loads(config_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config_path}: not JSON ({e})") from None
        expected = {"format", "model", "classes", "vocabulary", *HYPER}
        if not isinstance(config, dict) or set(config) != expected:
            have = set(config) if isinstance(config, dict) else set()
            raise CheckpointError(f"{config_path}: keys {sorted(have)}, expected {sorted(expected)}")
        if config["format"] != FORMAT or config["model"] != "NB-LR":
            raise CheckpointError(f"{config_path}: format {config['format']!r} of model {config['model']!r}; "
                                  f"this code reads format {FORMAT} of NB-LR (retrain with train.py)")
        for key, value in HYPER.items():
            if config[key] != value:
                raise CheckpointError(f"{config_path}: key {key!r} is {config[key]!r}, this code scores with {value!r}")
        if classes is not None and config["classes"] != list(classes):
            raise CheckpointError(f"{config_path}: classes {config['classes']}, the MDLM's are {list(classes)}")
        try:
            tensors = load_file(weights_path)
        except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
            raise CheckpointError(f"{weights_path}: not a safetensors file ({e})") from None
        if set(tensors) != {"weight", "bias"}:
            raise CheckpointError(f"{weights_path}: keys {sorted(tensors)}, expected ['bias', 'weight']")
        vocabulary, n_classes = config["vocabulary"], len(config["classes"])
        rows = 1 if n_classes == 2 else n_classes
        if tensors["weight"].shape != (rows, len(vocabulary)) or tensors["bias"].shape != (rows,):
            raise CheckpointError(f"{weights_path}: weight {tuple(tensors['weight'].shape)}, bias "
                                  f"{tuple(tensors['bias'].shape)}; expected ({rows}, {len(vocabulary)}) and ({rows},) "
                                  f"for {n_classes} classes and the {len(vocabulary)} n-grams of {config_path}")
        if len(set(vocabulary)) != len(vocabulary):
            raise CheckpointError(f"{config_path}: key 'vocabulary' lists an n-gram twice")
        return cls(vocabulary, tensors["weight"], tensors["bias"].astype(np.float64), config["classes"])
