"""Calibrated posteriors for the generative classifier: temperature scaling, NLL and ECE.

A text's class scores are s_c = log prior_c - NELBO_c(x) in nats (classify.py). Bayes rule would
give p(c | x) = softmax_c(s_c) if the NELBOs were exact log-likelihoods; they are bounds, summed
over hundreds of tokens, so softmax(s) is nearly always 0 or 1. Temperature scaling (Guo et al.
2017, "On Calibration of Modern Neural Networks", §4.2) divides the scores by one T > 0, fitted on
held-out labeled texts by minimising the negative log-likelihood; the argmax, and so the
accuracy, does not change. Also the AUROC and Wilson interval the reports use, and the fits'
file, calibration.json in every checkpoint folder (one fit per scoring key, keyed to the weights).
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from convert_hf import WEIGHTS, CheckpointError, atomic_write
from scoring import most_draws

ECE_BINS = 15  # Guo et al. 2017 use 15 equal-width confidence bins
FILE = "calibration.json"  # the fitted temperatures, beside config.json (classify.py --calibrate)


def softmax(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax over the last axis of scores / temperature: float [N, C] -> float64 [N, C], rows sum to 1."""
    z = np.asarray(scores, dtype=np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(-1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels, nats per text: probs [N, C], labels int [N]."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-300, None))))


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error (Naeini et al. 2015; Guo et al. 2017, Eq. 3): texts binned by the
    confidence max_c p(c | x) into n_bins equal-width bins of (0, 1]; the mean over bins, weighted
    by their share of texts, of |accuracy - mean confidence|. probs [N, C], labels int [N] -> [0, 1]."""
    confidence, pred = probs.max(1), probs.argmax(1)
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        inside = bins == b
        total += inside.mean() * abs((pred[inside] == labels[inside]).mean() - confidence[inside].mean())
    return float(total)


def fit_temperature(scores: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises nll(softmax(scores / T), labels): scores float [N, C] (nats), labels int [N].

    The NLL is convex in 1/T; it is minimised over log T with L-BFGS (torch.optim.LBFGS, strong
    Wolfe line search), starting from T = the mean absolute deviation of the scores from their
    row means, and kept within e^(+-7) of that start. Raises ValueError for fewer than 2 texts.
    If the scores separate the labels perfectly, the NLL tends to 0 as T -> 0: the search stops
    where its gradient vanishes (some T below the start), and such held-out texts give no reason
    to soften the posteriors.
    """
    if len(labels) < 2:
        raise ValueError(f"fitting a temperature needs at least 2 labeled texts, got {len(labels)}")
    s = torch.as_tensor(scores, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    spread = float((s - s.mean(1, keepdim=True)).abs().mean()) or 1.0
    low, high = np.log(spread) - 7, np.log(spread) + 7
    log_t = torch.tensor(np.log(spread), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(s / log_t.clamp(low, high).exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().clamp(low, high).exp())


def summary(scores: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """NLL and ECE of softmax(scores / temperature) on labeled texts (accuracy does not depend on T)."""
    probs = softmax(scores, temperature)
    return {"temperature": temperature, "nll": nll(probs, labels), "ece": ece(probs, labels)}


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % (z = 1.96) Wilson score interval of a proportion measured on n trials (Wilson 1927)."""
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def auroc(inside: np.ndarray, other: np.ndarray) -> float:
    """Area under the ROC curve of telling `other` texts from `inside` ones by a score (higher = more
    likely other): the probability that a random other text scores above a random inside one, a tie
    counting one half (the Mann-Whitney U statistic over n_in x n_other, Hanley & McNeil 1982).
    inside, other: float [n_in], [n_other], both non-empty -> [0, 1]; 0.5 = no better than chance.
    Raises ValueError for an empty side or a NaN score."""
    inside, other = np.asarray(inside, dtype=np.float64).ravel(), np.asarray(other, dtype=np.float64).ravel()
    if not len(inside) or not len(other) or np.isnan(inside).any() or np.isnan(other).any():
        raise ValueError(f"auroc needs non-empty, NaN-free scores on both sides (got {len(inside)} and {len(other)})")
    values, where, counts = np.unique(np.concatenate([inside, other]), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[where]  # 1-based ranks, a tie sharing its mean rank
    u = ranks[len(inside):].sum() - len(other) * (len(other) + 1) / 2
    return float(u / (len(inside) * len(other)))


# ---- calibration.json: the fits of a checkpoint, one per scoring key --------------------------
def scoring_key(readout: str, estimator: str) -> str:
    """What a calibration.json's temperature was fitted on: "posterior", or the NELBO estimator's name."""
    return "posterior" if readout == "posterior" else estimator


def calibration_key(paths: list[str]) -> list[str]:
    """What a calibration.json was fitted for: the SHA-256 of each checkpoint's model.safetensors, in
    class order. The weights, not the folder: a folder copied, moved or mounted elsewhere keeps its fit,
    and retrained weights in the same folder lose it."""
    key = []
    for p in paths:
        with open(Path(p, WEIGHTS), "rb") as f:
            key.append(hashlib.file_digest(f, "sha256").hexdigest())
    return key


def read_calibrations(path: Path) -> dict:
    """scoring key -> fitted record of a calibration.json ({} when there is none); a file of one
    record (written before fits were keyed) counts as the fit of its "estimator". Raises
    CheckpointError for a file that is not JSON."""
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not a calibration file ({e}); rerun classify.py --calibrate") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: not a calibration file (expected a JSON object); rerun classify.py --calibrate")
    return {saved.get("estimator"): saved} if "temperature" in saved else saved


def read_temperature(paths: list[str], estimator: str, mc_samples: int,
                     max_draws: int | None = None) -> tuple[float, str]:
    """(T, where it came from) from the checkpoints' calibration.json (classify.py --calibrate), which
    holds one fit per scoring key (scoring_key: "posterior", or the NELBO estimator's name);
    T = 1 (uncalibrated) when there is none for `estimator` (that key), or it was fitted for other
    checkpoints (the spread of the scores, and so T, depends on the readout and on the noise of
    the estimate). Another K is allowed and noted. Raises CheckpointError for an unreadable file."""
    path = Path(paths[0], FILE)
    fits = read_calibrations(path)
    if estimator not in fits:
        have = f" (it has {', '.join(fits)})" if fits else ""
        return 1.0, f"uncalibrated (no {estimator} fit in {path}{have}; run classify.py --calibrate)"
    saved = fits[estimator]
    try:
        temperature, fitted_for = float(saved["temperature"]), saved["checkpoints"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a calibration file ({type(e).__name__}: {e}); "
                              "rerun classify.py --calibrate") from None
    if fitted_for != calibration_key(paths) or not temperature > 0:
        return 1.0, f"uncalibrated ({path} was fitted for other checkpoints; run classify.py --calibrate)"
    same = estimator == "posterior" or saved.get("mc_samples") == mc_samples and saved.get(
        "max_draws", mc_samples) == most_draws(mc_samples, max_draws)
    note = "" if same else (f", fitted at K={saved.get('mc_samples')} up to "
                            f"{saved.get('max_draws', saved.get('mc_samples'))} draws")
    return temperature, f"T = {temperature:.4g} from {path}{note}"


def write_fit(paths: list[str], record: dict) -> None:
    """Add `record` (a fit: its "estimator" is the scoring key) to calibration.json in every
    checkpoint folder, beside the fits of the other keys; each file written whole or not at all."""
    for p in paths:
        fits = {**read_calibrations(Path(p, FILE)), record["estimator"]: record}
        atomic_write(Path(p, FILE), lambda f: f.write_text(json.dumps(fits, indent=1) + "\n"))
