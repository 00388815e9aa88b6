"""Calibrated posteriors for the generative classifier: temperature scaling, NLL and ECE.

A text's class scores are s_c = log prior_c - NELBO_c(x) in nats (classify.py). Bayes rule would
give p(c | x) = softmax_c(s_c) if the NELBOs were exact log-likelihoods; they are bounds, summed
over hundreds of tokens, so softmax(s) is nearly always 0 or 1. Temperature scaling (Guo et al.
2017, "On Calibration of Modern Neural Networks", §4.2) divides the scores by one T > 0, fitted on
held-out labeled texts by minimising the negative log-likelihood; the argmax, and so the
accuracy, does not change. The ensemble of the MDLM and the n-gram model (nblr.py) is calibrated
the same way, by maximum likelihood on held-out texts: its two weights and class biases
(fit_ensemble; Mesnil et al. 2014, arXiv 1412.5335) carry its temperature. Also the AUROC and Wilson interval the reports use, and the fits'
file, calibration.json in every checkpoint folder (one fit per scoring key, keyed to the weights).
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from convert_hf import WEIGHTS, CheckpointError, atomic_write
from nblr import WEIGHTS as NGRAM_WEIGHTS
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


ENSEMBLE_RIDGE = 1e-4  # keeps the ensemble's weights finite when held-out texts are separable; negligible otherwise


def ensemble_logits(features: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The ensemble's class logits l_c = sum_m w_m f_mc + b_c: features float [N, M, C] (component m's
    log p_m(c | x)), weights [M], bias [C] -> float64 [N, C]. Mesnil et al. 2014 (arXiv 1412.5335, §3)
    combine a generative and a discriminative model's log-probabilities this way."""
    return np.einsum("nmc,m->nc", np.asarray(features, np.float64), weights) + bias


def fit_ensemble(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood weights of the ensemble (ensemble_logits): a multinomial logistic regression
    of the labels on the M components' log-posteriors, one weight per component shared over classes
    and one bias per class (b_0 = 0: softmax ignores a common shift), with a ridge ENSEMBLE_RIDGE.
    features float [N, M, C], labels int [N] -> (weights float64 [M], bias float64 [C]).

    The weights carry the temperature: scaling them all by 1/T is a point of the same family, so at
    the maximum the NLL's derivative along that line is 0 and temperature scaling after them leaves T = 1.
    Fitted by L-BFGS (strong Wolfe) from w = 1, b = 0 (the product of the components' posteriors).
    Raises ValueError for fewer than 2 texts or features of another shape."""
    f = torch.as_tensor(features, dtype=torch.float64)
    if f.ndim != 3 or len(f) != len(labels) or len(labels) < 2:
        raise ValueError(f"fit_ensemble: features {tuple(f.shape)} must be [N, M, C] for N = {len(labels)} >= 2 labels")
    y = torch.as_tensor(labels, dtype=torch.long)
    w = torch.ones(f.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(f.shape[2] - 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = torch.einsum("nmc,m->nc", f, w) + torch.cat([b.new_zeros(1), b])
        loss = torch.nn.functional.cross_entropy(logits, y) + ENSEMBLE_RIDGE * (w.square().sum() + b.square().sum())
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy().copy(), np.concatenate([[0.0], b.detach().numpy()])


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
    """The MDLM's key in calibration.json: "posterior", or the NELBO estimator's name (NB-LR's fit is
    "ngram", the ensemble's ensemble_key of the MDLM's)."""
    return "posterior" if readout == "posterior" else estimator


def ensemble_key(mdlm_key: str) -> str:
    """The calibration.json key of the ensemble whose MDLM component is scored under `mdlm_key`."""
    return f"ensemble+{mdlm_key}"


def calibration_key(paths: list[str], ngram: bool = False) -> list[str]:
    """What a calibration.json was fitted for: the SHA-256 of each checkpoint's model.safetensors, in
    class order, and (ngram) of the first folder's ngram.safetensors. The weights, not the folder: a
    folder copied, moved or mounted elsewhere keeps its fit, and retrained weights in the same folder lose it."""
    files = [Path(p, WEIGHTS) for p in paths] + ([Path(paths[0], NGRAM_WEIGHTS)] if ngram else [])
    return [file_digest(path) for path in files]


def file_digest(path: Path) -> str:
    """The SHA-256 of a file, hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


def uses_ngram(key: str) -> bool:
    """Whether the fit of scoring key `key` depends on the n-gram model (and so is keyed to its weights)."""
    return key == "ngram" or key.startswith("ensemble+")


def read_fit(paths: list[str], key: str, mc_samples: int, max_draws: int | None = None) -> tuple[dict | None, str]:
    """(the record, where it came from) of scoring key `key` (scoring_key) in the checkpoints'
    calibration.json (classify.py --calibrate), or (None, why not) when there is none for that key
    or it was fitted for other weights (calibration_key: the spread of the scores depends on the
    readout, the weights and the noise of the estimate). Another K is allowed and noted. Raises
    CheckpointError for an unreadable file."""
    path = Path(paths[0], FILE)
    fits = read_calibrations(path)
    if key not in fits:
        have = f" (it has {', '.join(fits)})" if fits else ""
        return None, f"uncalibrated (no {key} fit in {path}{have}; run classify.py --calibrate)"
    saved = fits[key]
    try:
        fitted_for = saved["checkpoints"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a calibration file ({type(e).__name__}: {e}); "
                              "rerun classify.py --calibrate") from None
    if fitted_for != calibration_key(paths, ngram=uses_ngram(key)):
        return None, f"uncalibrated ({path} was fitted for other checkpoints; run classify.py --calibrate)"
    one_pass = key in ("posterior", "ngram", ensemble_key("posterior"))  # no Monte-Carlo draws behind the scores
    same = one_pass or saved.get("mc_samples") == mc_samples and saved.get(
        "max_draws", mc_samples) == most_draws(mc_samples, max_draws)
    note = "" if same else (f", fitted at K={saved.get('mc_samples')} up to "
                            f"{saved.get('max_draws', saved.get('mc_samples'))} draws")
    return saved, f"from {path}{note}"


def read_temperature(paths: list[str], estimator: str, mc_samples: int,
                     max_draws: int | None = None) -> tuple[float, str]:
    """(T, where it came from) of scoring key `estimator` (read_fit); T = 1 (uncalibrated) without a
    valid fit. Raises CheckpointError for an unreadable file or a temperature that is not a number > 0."""
    saved, source = read_fit(paths, estimator, mc_samples, max_draws)
    if saved is None:
        return 1.0, source
    try:
        temperature = float(saved["temperature"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{paths[0]}/{FILE}: not a calibration file ({type(e).__name__}: {e}); "
                              "rerun classify.py --calibrate") from None
    if not temperature > 0:
        return 1.0, f"uncalibrated ({paths[0]}/{FILE}: temperature {temperature}; run classify.py --calibrate)"
    return temperature, f"T = {temperature:.4g} {source}"


def read_ensemble(paths: list[str], mdlm_key: str, n_classes: int, mc_samples: int,
                  max_draws: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(weights float64 [2], bias float64 [C], where they came from) of the ensemble over the MDLM
    scored under `mdlm_key` (ensemble_key); without a valid fit, the product of the two posteriors
    (w = 1, 1; b = 0), uncalibrated. Raises CheckpointError for an unreadable record."""
    saved, source = read_fit(paths, ensemble_key(mdlm_key), mc_samples, max_draws)
    if saved is None:
        return np.ones(2), np.zeros(n_classes), source.replace("uncalibrated", "uncalibrated: w = 1, 1", 1)
    try:
        weights, bias = np.asarray(saved["weights"], np.float64), np.asarray(saved["bias"], np.float64)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{paths[0]}/{FILE}: not a calibration file ({type(e).__name__}: {e}); "
                              "rerun classify.py --calibrate") from None
    if weights.shape != (2,) or bias.shape != (n_classes,) or not np.isfinite([*weights, *bias]).all():
        raise CheckpointError(f"{paths[0]}/{FILE}: the {ensemble_key(mdlm_key)} fit has weights {weights.tolist()} "
                              f"and bias {bias.tolist()} (expected 2 and {n_classes} finite numbers); "
                              "rerun classify.py --calibrate")
    return weights, bias, f"w = {weights[0]:.3g} (MDLM), {weights[1]:.3g} (NB-LR) {source}"


def write_fit(paths: list[str], record: dict) -> None:
    """Add `record` (a fit: its "estimator" is the scoring key) to calibration.json in every
    checkpoint folder, beside the fits of the other keys; each file written whole or not at all."""
    for p in paths:
        fits = {**read_calibrations(Path(p, FILE)), record["estimator"]: record}
        atomic_write(Path(p, FILE), lambda f: f.write_text(json.dumps(fits, indent=1) + "\n"))
