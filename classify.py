"""Classification with MDLMs: the one-pass label posterior of a joint model, or Bayes rule over NELBO bounds,
alone or in an ensemble with an n-gram model.

The ensemble (--readout ensemble, the default where a checkpoint holds both components): train.py
fits NB-LR on word uni+bigrams (nblr.py) beside the MDLM, on the same labeled texts, and a text's
class logits are w_1 log p_MDLM(c | x) + w_2 log p_NB-LR(c | x) + b_c, the weights and biases fitted
by maximum likelihood on held-out validation texts by --calibrate (calibration.fit_ensemble;
Mesnil et al. 2014, arXiv 1412.5335: a generative and a bag-of-words model err on different
texts). The MDLM component is the MDLM's default readout below; --readout ngram is NB-LR alone.

The MDLM's two readouts. "posterior" (a joint checkpoint, train.py --class all):
the model over (label, text) reads p(c | text) from its denoiser at the masked label slot with the
text clean, one forward pass per window (diffusion.label_posterior, scoring.score_posterior), no
Monte-Carlo draws; the score of class c is -log p(c | text). "nelbo" (per-class models, or a joint
checkpoint with its slot clamped to c): the scorer of class c gives an upper bound
NELBO_c(x) >= -log p(x | c) (diffusion.py), and a text gets label argmax_c [log prior_c - NELBO_c(x)].
Either way posteriors are softmax_c(-score_c / T) (uniform prior for the NELBO readout; T from
temperature scaling, calibration.py, stored in calibration.json by --calibrate; T = 1 without it).
NELBO_c(x) is estimated with K Monte-Carlo draws per text, and the
*same* draws for every class (common random numbers), so the noise of the estimate largely
cancels in the comparison. Two estimators: "time" (default; t ~ U antithetic, weight 1/t:
diffusion.nelbo, Eq. 11) and "count" (k ~ U{1..n} masked tokens, weight n/k:
diffusion.nelbo_count); docs/draws.md has their measured standard errors. A text longer than
model_length is scored whole: the NELBOs of its disjoint windows (data.windows) are summed. Sequential
scoring (--max-draws, scoring.score_sequential) spends the draws where they are needed: rounds of K
draws, and a text whose margin is already more than --z standard errors from 0 gets no more.

From Python (a notebook):

    from classify import DiffusionClassifier
    clf = DiffusionClassifier.from_checkpoints("ckpt/all")   # or ["ckpt/neg", "ckpt/pos"], one per class
    clf.predict(["What a wonderful film"])   # ['pos']

From the shell:

    python classify.py --ckpt ckpt/all --calibrate                 # fit T and the ensemble on held-out texts
    python classify.py --ckpt ckpt/all --limit 1000 --json out.json            # the ensemble, each component too
    python classify.py --ckpt ckpt/all --readout posterior --limit 1000        # the MDLM alone
    python classify.py --ckpt ckpt/all --readout nelbo --limit 1000 --mc-samples 4   # Bayes rule over NELBO(text | c)
    python classify.py --ckpt0 ckpt/neg --ckpt1 ckpt/pos --limit 1000   # one model per class
    python classify.py --ckpt ckpt/a --ckpt ckpt/b --ckpt ckpt/c --data my.jsonl     # its held-out test split
    echo "What a wonderful film" | python classify.py --ckpt ckpt/all --input -

The JSON has one row per text: its id (IMDB: the file in aclImdb; other data: its position; --input:
its line number or file name), the text, the true and predicted class names, the posterior, the
scores (the NELBO under every class, -log p(c | text), or the ensemble's -logits), and the margin
(the second-best class's score minus the best's, nats) with its paired standard error over the
draws (NELBO readout); an ensemble's rows also hold each component's log p(c | text). Ctrl-C writes the rows scored so far, marked
"partial": true, and exits with status 130.
"""
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import calibration
from cli import ArgumentParser, add_scoring_args, checkpoint_data, fail, init_distributed, preflight, run_cli
from cli import progress as progress_bar  # the flag `progress` turns it on
import data
from convert_hf import CheckpointError, atomic_write, load_hf, read_config
from nblr import NBLR, WEIGHTS as NGRAM_WEIGHTS, CONFIG as NGRAM_CONFIG
from model import PrecisionError, set_runtime
from scoring import (ESTIMATORS, ScoringError, draws_taken, most_draws, paired_margin, score_draws, score_posterior,
                     score_sequential)
import train

CALIBRATION_TEXTS = 200  # --calibrate's default for the NELBO readout (IMDB, 2 class models, CPU: about a minute)
# the novelty score's draws per text: its noise is what blurs in-domain against other (IMDB subset C vs the
# 7,600 AG News texts: AUROC 0.9375 at 8 draws, 0.9831 at 32; docs/few_labels.md)
NOVELTY_DRAWS = 32
MIN_FIT_CALIBRATION = 50  # fit's held-out texts below which it leaves the posteriors uncalibrated (3 weights from
                          # a handful of texts would be noise; the ensemble is then the product of the two posteriors)
SLICE_BATCHES = 32  # forward passes per process between two chances for Ctrl-C to keep the results so far


READOUTS = ("posterior", "nelbo")  # the MDLM's: the one-pass label-slot posterior (joint checkpoints), Bayes rule over NELBOs


def posteriors(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Tempered posteriors softmax_c(-score_c / T) (calibration.py): Bayes rule with a uniform prior over
    NELBO scores, or the tempered one-pass posterior when score = -log p(c | text) (its training prior
    already in it). score [N, C] nats -> float64 [N, C], rows sum to 1."""
    return calibration.softmax(-scores, temperature)


def load_class_models(paths: list[str], device, precision: str = "auto") -> tuple[list, list[str], list | None]:
    """The scorers of a classifier: (models, class names, class labels or None).

    One joint checkpoint (train.py --class all): the same model C times with labels
    0..C-1. Several checkpoints: one unconditional class model per class, in class order (labels
    None). Each model is set up for inference at `precision` (model.set_runtime: on CUDA the weights
    are cast to bf16 once). Raises CheckpointError if the model configs differ, a conditional checkpoint is not
    alone, a class model was trained for another class index or on other classes, or there is not
    one checkpoint per class of its training data; DataError if the vocabulary is not GPT-2's.
    """
    configs = [read_config(Path(p)) for p in paths]
    cfg0, raw0 = configs[0]
    data.check_vocab(cfg0.vocab_size, paths[0])
    if len(paths) == 1:
        if not cfg0.n_classes:
            base = (" (a base of p(text): fine-tune it with train.py --class all --init DIR)"
                    if raw0.get("class_name") == train.BASE else "")
            raise CheckpointError(f"{paths[0]}: an unconditional model{base}; give one checkpoint per class, or one "
                                  "joint checkpoint over (label, text) (train.py --class all)")
        names = raw0.get("classes") or [str(c) for c in range(cfg0.n_classes)]
        if len(names) != cfg0.n_classes:
            raise CheckpointError(f"{paths[0]}: n_classes {cfg0.n_classes} but {len(names)} class names")
        model = set_runtime(load_hf(paths[0]).to(device), precision, inference=True)
        return [model] * cfg0.n_classes, list(names), list(range(cfg0.n_classes))
    for p, (cfg, raw) in zip(paths, configs):
        if cfg.n_classes:
            raise CheckpointError(f"{p}: a joint checkpoint (train.py --class all) scores every class "
                                  "by itself; pass it alone (--ckpt DIR)")
    for p, (cfg, raw) in zip(paths[1:], configs[1:]):
        if cfg != cfg0:
            raise CheckpointError(f"{p}: config {cfg} differs from {paths[0]}: {cfg0} (class models must match)")
        if raw.get("classes") != raw0.get("classes"):
            raise CheckpointError(f"{p}: trained on classes {raw.get('classes')}, {paths[0]} on {raw0.get('classes')}")
    if "classes" in raw0 and len(raw0["classes"]) != len(paths):
        raise CheckpointError(f"{paths[0]}: its data has {len(raw0['classes'])} classes "
                              f"({', '.join(raw0['classes'])}), "
                              f"but {len(paths)} checkpoints were given (one per class, in class order)")
    names = []
    for c, (p, (_, raw)) in enumerate(zip(paths, configs)):
        if raw.get("class_name") == train.BASE:
            raise CheckpointError(f"{p}: a base of p(text) (train.py --class none) holds no class; fine-tune it: "
                                  f"train.py --class {c} --init {p} (one per class), or --class all --init {p}")
        if raw.get("class_index", c) != c:
            raise CheckpointError(f"{p}: trained for class {raw['class_index']}, but passed as class {c}")
        names.append(raw.get("class_name", str(c)))
    return [set_runtime(load_hf(p).to(device), precision, inference=True) for p in paths], names, None


def load_ngram(paths: list[str], classes: list[str]) -> NBLR | None:
    """The n-gram component of the checkpoints (nblr.NBLR, fitted by train.py on the labeled training
    texts), or None when they have none. Per-class checkpoints each hold a copy fitted on the same
    labels: they must be the same file. Raises CheckpointError for an unreadable one (NBLR.load),
    or copies that differ or are missing from some of the folders."""
    ngram = NBLR.load(paths[0], classes)
    digest = lambda p: calibration.file_digest(Path(p, NGRAM_WEIGHTS)) if Path(p, NGRAM_WEIGHTS).is_file() else None
    first = digest(paths[0]) if len(paths) > 1 else None  # one folder: nothing to compare
    for p in paths[1:]:
        if digest(p) != first:
            raise CheckpointError(f"{p}: its n-gram model ({NGRAM_WEIGHTS}) is not {paths[0]}'s; class models of one "
                                  "classifier are trained on one label set (the same --labeled-limit and --seed)")
    return ngram


def check_texts(texts) -> list[str]:
    """texts must be a list (or tuple) of strings: a lone string would be scored one character at a time."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings (wrap a single text in a list: [text])")
    return list(texts)


class DiffusionClassifier:
    """A generative classifier from one joint MDLM over (label, text), or one MDLM per class, for use from Python.

        clf = DiffusionClassifier().fit(texts, labels)   # trains train.py's CPU recipe in-process
        clf.save("ckpt/mine")                                         # a train.py checkpoint folder
        clf = DiffusionClassifier.from_checkpoints("ckpt/all")   # or ["ckpt/neg", "ckpt/pos"], one per class
        clf.classes_                # ['neg', 'pos'] (also clf.classes)
        clf.predict(texts)          # list of N class names
        clf.predict_proba(texts)    # float64 [N, C], rows sum to 1: softmax(-score / T)
        clf.class_scores(texts)     # float64 [N, C] nats, lower = more probable: NELBO_c(text) or -log p(c | text)

    Two readouts. "posterior" (the default for a joint checkpoint): one forward pass per window,
    the label slot masked, score_c = -log p(c | text) (score_posterior); no Monte-Carlo draws.
    "nelbo" (per-class models; a joint checkpoint with readout="nelbo"): Bayes rule over the class
    NELBOs, score_c = NELBO_c(text) (the slot clamped to c), estimated by sequential Monte-Carlo draws.

    texts: a list of N strings, each with at least one token (cleaned and encoded as in training;
    any length: long texts are scored window by window, see score_draws). Results are
    deterministic given `seed`: text i of a call always gets the same Monte-Carlo draws, shared by
    every class (common random numbers); batches are grouped by length internally. Uniform class
    prior; the temperature T comes from the checkpoints' calibration.json (1 without one).
    """

    def __init__(self, models: list | None = None, classes: list[str] | None = None, mc_samples: int = 2, seed: int = 0,
                 batch_size: int = 16, class_labels: list | None = None, estimator: str = "time",
                 temperature: float = 1.0, max_draws: int | None = None, z: float = 2.0, readout: str = "nelbo",
                 log_prior=None, *,
                 preset: str = "tiny", max_steps: int | None = None, lr: float | None = None, disc_weight: float = 10.0,
                 eval_every: int | None = None, init: str = "scratch", out: str | None = None):
        """Without models: an unfitted classifier holding fit's hyper-parameters (scikit-learn's convention),
        the defaults train.py's (None: train.py's default, for tiny from scratch the CPU recipe,
        train.CPU_RECIPE; --class all --disc-weight 10, --batch-size batch_size, --seed seed);
        init: "scratch", a checkpoint folder or a hub id (preset applies to scratch only); out: the
        checkpoint folder fit trains into (default: a new temporary folder, kept: see save).
        models: C scorers in class order, eval mode, on one device (one DiT per class, or one conditional DiT
        C times with class_labels 0..C-1); classes: their names. Sequential scoring (score_sequential):
        rounds of mc_samples = K draws, up to max_draws (default 4 K; = K for fixed-K scoring) per
        text, a text stopping once its margin exceeds z standard errors; batch_size: texts
        (windows) per forward pass, each with its mc_samples draws; estimator: "time" or "count" (score_draws).
        readout: "nelbo" or "posterior" (needs a model with a label slot; log_prior: float [C], the
        training labels' log-frequencies, for texts of several windows, or None: uniform).
        Raises ValueError for mc_samples, batch_size, max_draws, z or temperature out of range, or an
        unknown estimator or readout (or "posterior" for a model without a label slot)."""
        self.train_params = {"preset": preset, "max_steps": max_steps, "lr": lr, "disc_weight": disc_weight,
                             "eval_every": eval_every, "init": init, "out": out}
        self.checkpoint_ = None  # the folder the weights came from (from_checkpoints, fit): what save copies
        if models is None:  # unfitted: fit builds the rest; its scoring settings checked now, not after training
            if (mc_samples < 1 or batch_size < 1 or (max_draws or mc_samples) % mc_samples or not z > 0
                    or estimator not in ESTIMATORS):
                raise ValueError(f"mc_samples {mc_samples}, batch_size {batch_size} must be >= 1, "
                                 f"max_draws {max_draws} a multiple of mc_samples, z {z} > 0, "
                                 f"estimator one of {', '.join(ESTIMATORS)}")
            self.mc_samples, self.seed, self.batch_size = mc_samples, seed, batch_size
            self.z, self.max_draws = z, max_draws
            self.estimator, self.models = estimator, None
            self.combine, self.ngram, self.components_ = "mdlm", None, {}
            return
        if readout not in READOUTS or (readout == "posterior" and not models[0].config.n_classes):
            raise ValueError(f"readout {readout!r}: expected one of {', '.join(READOUTS)} (posterior needs a joint "
                             "model over (label, text), train.py --class all)")
        if (mc_samples < 1 or batch_size < 1 or not temperature > 0 or (max_draws or mc_samples) % mc_samples
                or not z > 0):
            raise ValueError(f"mc_samples {mc_samples}, batch_size {batch_size} must be >= 1, max_draws {max_draws} a "
                             f"multiple of mc_samples, z {z} and temperature {temperature} > 0")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator {estimator!r}: expected one of {', '.join(ESTIMATORS)}")
        self.models, self.classes, self.class_labels = models, list(classes), class_labels
        self.mc_samples, self.seed, self.batch_size, self.z = mc_samples, seed, batch_size, z
        self.max_draws = max_draws  # None: 4 x mc_samples, resolved when scoring (mc_samples may be changed later)
        self.estimator, self.temperature, self.readout, self.log_prior = estimator, temperature, readout, log_prior
        self.temperature_source = f"T = {temperature:.4g} (given)"  # from_checkpoints: where T was read
        self.device = next(models[0].parameters()).device
        # the MDLM alone unless from_checkpoints finds an n-gram model (nblr.py) beside it
        self.combine, self.ngram, self.components_ = "mdlm", None, {}

    @classmethod
    def from_checkpoints(cls, paths: list[str] | str, device=None, mc_samples: int = 2, seed: int = 0,
                         batch_size: int = 16, estimator: str = "time", max_draws: int | None = None,
                         z: float = 2.0, precision: str = "auto", readout: str | None = None) -> "DiffusionClassifier":
        """Load one joint checkpoint, or one checkpoint per class in class order (train.py
        folders), onto `device` (default: CUDA if available, else CPU), with the temperature of their
        calibration.json, at `precision` (model.set_runtime). Raises CheckpointError / DataError as
        load_class_models, CheckpointError for the count estimator on a time-conditioned model, and
        ValueError for a precision this device cannot run. paths: a list, or one folder as a string.
        readout: "ensemble" (the MDLM and the n-gram model combined, the default where the checkpoints
        hold both), "ngram" (NB-LR alone), or the MDLM alone: "posterior" (a joint checkpoint's
        default) or "nelbo" (per-class models'). In the ensemble the MDLM is read with its default.
        Raises CheckpointError for "ensemble" or "ngram" on checkpoints without an n-gram model."""
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if readout is not None and readout not in READOUTS + ("ensemble", "ngram"):
            raise ValueError(f"readout {readout!r}: expected one of ensemble, {', '.join(READOUTS)}, ngram")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        models, classes, class_labels = load_class_models(paths, device, precision)
        joint = bool(models[0].config.n_classes)
        ngram = load_ngram(paths, classes)
        if readout in ("ensemble", "ngram") and ngram is None:
            raise CheckpointError(f"{paths[0]}: no n-gram model ({NGRAM_WEIGHTS}) for --readout {readout}; "
                                  "train.py fits one beside the MDLM (retrain, or pass --readout "
                                  f"{'posterior' if joint else 'nelbo'})")
        combine = ("ensemble" if ngram is not None else "mdlm") if readout is None else \
            readout if readout in ("ensemble", "ngram") else "mdlm"
        readout = readout if readout in READOUTS else ("posterior" if joint else "nelbo")
        if readout == "posterior" and not joint:
            raise CheckpointError(f"{paths[0]}: per-class models have no label slot; the posterior readout needs one "
                                  "joint checkpoint (train.py --class all); pass --readout nelbo")
        prior = read_config(Path(paths[0]))[1].get("class_prior")
        # a class never seen in training gets a tiny prior, not log 0
        log_prior = None if prior is None else np.log(np.maximum(np.asarray(prior, dtype=np.float64), 1e-12))
        if estimator == "count" and models[0].config.time_conditioning:
            raise CheckpointError(f"{paths[0]}: a time-conditioned model; the count estimator needs one without "
                                  "time conditioning (pass --estimator time)")
        mdlm_key = calibration.scoring_key(readout, estimator)
        temperature, source = calibration.read_temperature(paths, mdlm_key, mc_samples, max_draws)
        clf = cls(models, classes, mc_samples, seed, batch_size, class_labels, estimator, temperature, max_draws, z,
                  readout, log_prior)
        clf.temperature_source, clf.checkpoint_ = source, paths
        if ngram is not None:
            clf.set_ngram(ngram, combine, calibration.read_temperature(paths, "ngram", mc_samples, max_draws),
                          calibration.read_ensemble(paths, mdlm_key, len(classes), mc_samples, max_draws))
        return clf

    def set_ngram(self, ngram: NBLR, combine: str, ngram_fit: tuple[float, str],
                  ensemble_fit: tuple[np.ndarray, np.ndarray, str]) -> None:
        """Add the n-gram component: ngram_fit (its T, where from), ensemble_fit (weights [2], bias [C],
        where from); combine: what predict_proba reads ("ensemble", "mdlm" or "ngram"). The MDLM's own
        temperature stays in components_["mdlm"]; .temperature becomes the one of `combine`."""
        self.ngram, self.combine = ngram, combine
        self.components_ = {"mdlm": (self.temperature, self.temperature_source), "ngram": ngram_fit}
        self.ensemble_weights, self.ensemble_bias, ensemble_source = ensemble_fit
        if combine == "ngram":
            self.temperature, self.temperature_source = ngram_fit
        elif combine == "ensemble":  # its fitted weights carry its temperature (calibration.fit_ensemble)
            self.temperature, self.temperature_source = 1.0, ensemble_source

    @property
    def readout_name(self) -> str:
        """What predict_proba reads, as classify.py --readout names it: ensemble, ngram, posterior or nelbo."""
        return self.readout if self.combine == "mdlm" else self.combine

    def components(self, mdlm_scores: np.ndarray, texts: list[str],
                   ngram_log_proba: np.ndarray | None = None) -> np.ndarray:
        """Each component's log-posterior, float64 [N, 2, C]: [:, 0] the MDLM's, log softmax_c(-score_c)
        (posterior readout: log p(c | text) itself; nelbo: Bayes rule over the NELBOs, uniform prior),
        [:, 1] the n-gram model's (nblr.NBLR.log_proba, or ngram_log_proba if already computed).
        mdlm_scores [N, C] nats (class_scores_encoded)."""
        mdlm = -np.asarray(mdlm_scores, np.float64)
        ngram = self.ngram.log_proba(texts) if ngram_log_proba is None else ngram_log_proba
        return np.stack([mdlm - np.logaddexp.reduce(mdlm, axis=1, keepdims=True), ngram], 1)

    def combined_scores(self, mdlm_scores: np.ndarray | None, texts: list[str],
                        ngram_log_proba: np.ndarray | None = None) -> np.ndarray:
        """The scores predict_proba reads, float64 [N, C] nats, lower = more probable: the MDLM's
        (mdlm_scores [N, C], unchanged), the n-gram model's -log p(c | text), or the ensemble's
        -(w_1 log p_MDLM(c | x) + w_2 log p_NB-LR(c | x) + b_c) (calibration.ensemble_logits).
        ngram_log_proba: the n-gram model's log p(c | text) if already computed."""
        if self.combine == "mdlm":
            return mdlm_scores
        if self.combine == "ngram":
            return -(self.ngram.log_proba(texts) if ngram_log_proba is None else ngram_log_proba)
        features = self.components(mdlm_scores, texts, ngram_log_proba)
        return -calibration.ensemble_logits(features, self.ensemble_weights, self.ensemble_bias)

    def check_fitted(self) -> None:
        """Raise ValueError (scikit-learn's NotFittedError is one) for a classifier with no model yet."""
        if self.models is None:
            raise ValueError("this DiffusionClassifier has no model yet: call fit(texts, labels), or load one with "
                             "DiffusionClassifier.from_checkpoints(folder)")

    @property
    def classes_(self) -> list[str]:
        """The class names, in the order of predict_proba's columns (scikit-learn's name)."""
        self.check_fitted()
        return self.classes

    def fit(self, texts: list[str], labels: list) -> "DiffusionClassifier":
        """Train one joint model over (label, text) on these texts, in this process, with a progress bar
        (train.train: the same loop, checkpoints and log as train.py, into `out`; it also fits the n-gram
        component, nblr.py), then load it. labels: one per text, any values (their str() are the class
        names, sorted); None marks an unlabeled text, which trains p(text) (train.py --unlabeled: half of
        every micro-batch). 5 % of each class is held out: for the validation log, and (at least
        MIN_FIT_CALIBRATION texts) to fit the temperatures and the ensemble's weights (fit_calibrations),
        so that predict_proba is the calibrated ensemble's posterior. Returns self. Raises TypeError for texts that are not a
        list of strings, ValueError naming the argument for labels of another length, fewer than two
        classes, or hyper-parameters train.py refuses (named as here: max_steps, not --max-steps)."""
        texts = check_texts(texts)
        labels = list(labels)
        if len(labels) != len(texts):
            raise ValueError(f"labels: {len(labels)} labels for {len(texts)} texts (one per text; None = unlabeled)")
        classes = sorted({str(y) for y in labels if y is not None})
        if len(classes) < 2:
            raise ValueError(f"labels: {len(classes)} class ({', '.join(classes) or 'none'}); "
                             "a classifier needs two or more")
        reviews = [data.Review(t, data.UNLABELED if y is None else classes.index(str(y)), i, 0)
                   for i, (t, y) in enumerate(zip(texts, labels))]
        hp, unlabeled = self.train_params, [r for r in reviews if r.label == data.UNLABELED]
        given = {"init": hp["init"], "preset": hp["preset"] if hp["init"] == "scratch" else None,
                 "max_steps": hp["max_steps"], "lr": hp["lr"], "eval_every": hp["eval_every"],
                 "batch_size": self.batch_size, "seed": self.seed, "disc_weight": hp["disc_weight"],
                 "unlabeled": bool(unlabeled)}
        cfg = train.TrainConfig(cls="all", out=hp["out"] or tempfile.mkdtemp(prefix="mdlm-fit-"),
                                **{k: v for k, v in given.items() if v is not None})
        try:
            train.check_config(cfg)
        except train.ConfigError as e:  # named as this API names it: max_steps, not --max-steps
            raise ValueError(f"fit: argument {e.name}: {e}") from None
        train.resolve_config(cfg)
        try:
            train.train(cfg, [], ([r for r in reviews if r.label != data.UNLABELED], classes, unlabeled))
        except SystemExit as e:
            raise RuntimeError(f"fit: training stopped (exit status {e.code}; its message is above)") from None
        fitted = DiffusionClassifier.from_checkpoints(cfg.out, mc_samples=self.mc_samples, seed=self.seed,
                                                      batch_size=self.batch_size, estimator=self.estimator,
                                                      max_draws=self.max_draws, z=self.z)
        val = data.train_val_split([r for r in reviews if r.label != data.UNLABELED])[1]
        if len(val) >= MIN_FIT_CALIBRATION:  # the temperatures and the ensemble's weights, on texts never trained on
            fit_calibrations(fitted, [cfg.out], fitted.class_scores_encoded(data.encode([r.text for r in val])),
                             [r.text for r in val], np.array([r.label for r in val]))
        params = self.train_params
        self.__dict__.update(fitted.__dict__)
        self.train_params = params
        return self

    def save(self, folder: str) -> Path:
        """Copy the model (config.json, model.safetensors, the n-gram model's ngram.json and
        ngram.safetensors, and calibration.json if fitted) into `folder`,
        a train.py checkpoint folder that from_checkpoints and classify.py --ckpt load. Returns its path.
        Raises ValueError for a classifier that was neither fitted nor loaded from one joint checkpoint."""
        if not self.checkpoint_ or len(self.checkpoint_) != 1:
            raise ValueError("save: nothing to save (fit first), or several per-class checkpoints (save each folder)")
        source = Path(self.checkpoint_[0])
        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        if source.resolve() == target.resolve():
            return target
        for name in ("config.json", "model.safetensors") + ((NGRAM_CONFIG, NGRAM_WEIGHTS) if self.ngram else ()):
            shutil.copy2(source / name, target / name)
        if (source / calibration.FILE).is_file():  # keyed by the weights (calibration_key): valid in the copy as it is
            shutil.copy2(source / calibration.FILE, target / calibration.FILE)
        return target

    def class_scores(self, texts: list[str]) -> np.ndarray:
        """The score of every class in nats, float64 [N, C], lower = more probable (predict_proba is
        softmax(-score / T)): NELBO_c(text) (Eq. 11, an upper bound on -log p(text | c)) under readout
        "nelbo", -log p(c | text) under "posterior".
        Under the ensemble (or "ngram"), the combined scores of combined_scores.
        Raises TypeError for a string instead of a list, DataError for a text with no tokens."""
        texts = check_texts(texts)
        mdlm = None if self.combine == "ngram" else self.class_scores_encoded(data.encode(texts))
        return self.combined_scores(mdlm, texts)

    def draws(self, token_lists: list[list[int]], progress: bool = False,
              index: np.ndarray | None = None) -> np.ndarray:
        """Per-draw NELBOs of texts already encoded (data.encode): float64 [N, C, max_draws] nats, NaN
        after a text's last draw (score_sequential, whose `index` lets texts be scored in slices;
        fixed K when max_draws = mc_samples). Readout "posterior": [N, C, 1], -log p(c | text).
        Raises ValueError for a classifier not fitted."""
        self.check_fitted()
        if self.readout == "posterior":
            return -score_posterior(self.models[0], token_lists, self.batch_size, self.device, self.log_prior,
                                    progress)[:, :, None]
        return score_sequential(self.models, token_lists, self.mc_samples, self.most_draws(), self.z, self.seed,
                                self.batch_size, self.device, self.class_labels, self.estimator, progress, index)

    def most_draws(self) -> int:
        """The most draws a text can get (module function most_draws; 1 for the posterior readout)."""
        self.check_fitted()
        return 1 if self.readout == "posterior" else most_draws(self.mc_samples, self.max_draws)

    def class_scores_encoded(self, token_lists: list[list[int]], progress: bool = False) -> np.ndarray:
        """class_scores of texts already encoded: N non-empty lists of GPT-2 ids -> float64 [N, C] nats."""
        return np.nanmean(self.draws(token_lists, progress), -1)

    def novelty(self, texts: list[str], progress: bool = False, draws: int | None = None) -> np.ndarray:
        """How unlike the training texts each of N strings is, float64 [N] nats/token (novelty_encoded:
        the MDLM's p(text), whatever the readout). Raises TypeError for a string instead of a list,
        DataError for a text with no tokens."""
        return self.novelty_encoded(data.encode(check_texts(texts)), progress, draws=draws)

    def novelty_encoded(self, token_lists: list[list[int]], progress: bool = False, index: np.ndarray | None = None,
                        draws: int | None = None) -> np.ndarray:
        """How unlike the training texts each text is: an upper bound on -log p(text) per token, float64
        [N], nats/token (higher = more novel), over all of a long text's windows (score_draws).

        A joint model: the NELBO of the text alone, its label slot masked ("label unknown": the
        model's p(text) with the label marginalised out, diffusion.joint_nelbo for an unlabeled
        text), with `draws` Monte-Carlo draws (default NOVELTY_DRAWS; estimator as set). One model per
        class: the mixture bound -log sum_c prior_c exp(-NELBO_c(text)) >= -log p(text), since each
        NELBO_c >= -log p(text | c) (Eq. 11; uniform prior without the checkpoint's class_prior).
        token_lists: N non-empty lists of GPT-2 ids (data.encode); index: as in draws."""
        self.check_fitted()
        draws = draws or NOVELTY_DRAWS
        if self.models[0].config.n_classes:
            nats = score_draws(self.models[:1], token_lists, draws, self.seed, self.batch_size, self.device,
                               [self.models[0].config.n_classes], self.estimator, progress, index).mean(-1)[:, 0]
        else:
            nelbo = score_draws(self.models, token_lists, draws, self.seed, self.batch_size, self.device,
                                self.class_labels, self.estimator, progress, index).mean(-1)
            uniform = np.full(len(self.models), -np.log(len(self.models)))
            log_prior = uniform if self.log_prior is None else self.log_prior
            nats = -np.logaddexp.reduce(log_prior - nelbo, axis=1)
        return nats / np.array([len(ids) for ids in token_lists])

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """Calibrated posterior p(c | text): float64 [N, C], rows sum to 1 (readout "nelbo": a uniform prior)."""
        return posteriors(self.class_scores(texts), self.temperature)

    def predict(self, texts: list[str]) -> list[str]:
        """The most probable class name of each text (argmax of predict_proba)."""
        return [self.classes[c] for c in self.predict_proba(texts).argmax(1)]


# ---- the command line: its helpers, then parse -> texts -> score -> summarise -> print, run in that order
def accuracy_report(labels: np.ndarray, pred: np.ndarray, names: list[str]) -> dict:
    """Accuracy with its 95% Wilson score interval (Wilson 1927), confusion matrix (rows = true class,
    columns = predicted) and per-class precision/recall."""
    C = len(names)
    cm = np.zeros((C, C), dtype=int)
    np.add.at(cm, (labels, pred), 1)
    per_class = {names[c]: {"precision": cm[c, c] / max(cm[:, c].sum(), 1), "recall": cm[c, c] / max(cm[c].sum(), 1),
                            "support": int(cm[c].sum()), "predicted": int(cm[:, c].sum())} for c in range(C)}
    acc = float(np.mean(labels == pred))
    return {"accuracy": acc, "accuracy_ci95": list(calibration.wilson_interval(acc, len(labels))),
            "confusion_matrix": cm.tolist(), "per_class": per_class}


def read_input(path: str) -> tuple[list[str], list]:
    """The user's own texts: (texts, their ids). A file or '-' (stdin): one text per line, blank
    lines skipped, ids = line numbers (from 1), so results stay aligned with the file. A folder:
    one text per .txt file, in name order, ids = file names. A text longer than model_length tokens
    is scored whole, in windows (score_draws). Raises DataError for a missing path, a text that is
    not UTF-8 (named), or no text at all."""
    if path != "-" and Path(path).is_dir():
        files = sorted(Path(path).glob("*.txt"))
        texts = [data.decode_utf8(f.read_bytes(), f) for f in files]
        rows = [(f.name, text) for f, text in zip(files, texts) if text.strip()]
        expected = "expected .txt files, one text each"
    elif path == "-" or Path(path).is_file():
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        rows = [(n, text) for n, text in data.utf8_lines(raw, f"--input {path}") if text.strip()]
        expected = "expected one text per line"
    else:
        raise data.DataError(f"--input {path}: no such file or folder")
    if not rows:
        raise data.DataError(f"--input {path}: no text ({expected})")
    return [text for _, text in rows], [i for i, _ in rows]


def labeled_texts(args) -> tuple[list[data.Review], list[str]]:
    """The labeled texts a CLI evaluates, and the class names their labels index: every labeled text
    of --test-data if given (rows with an empty label are left out: there is nothing to score them
    against), else the --split of --data (a dataset without splits: its held-out test split), cut
    to a balanced, seeded --limit. Raises DataError."""
    if args.test_data:
        reviews, names = data.read_labeled(args.test_data, args.text_field, args.label_field)
        reviews = [r for r in reviews if r.label != data.UNLABELED]
    else:
        reviews, names = data.load_dataset(args.data, args.split, args.text_field, args.label_field)
    return (data.balanced_subset(reviews, args.limit) if args.limit else reviews), names


def calibrate(args, clf: DiffusionClassifier, paths: list[str], rank: int = 0) -> None:
    """--calibrate: fit T on the held-out validation texts of the training data (the 5% of each class
    that train.py never trains on, data.train_val_split; --limit: a balanced subset of them) and
    write it to calibration.json in every checkpoint folder. Under torchrun every rank scores its
    share (score_draws); rank 0 fits and writes."""
    reviews, data_names = data.load_dataset(args.data, "train", args.text_field, args.label_field)
    val = data.train_val_split(reviews)[1]
    if data_names != clf.classes:
        raise data.DataError(f"{args.data}: classes {', '.join(data_names)}, "
                             f"the checkpoints' are {', '.join(clf.classes)}")
    # by default about a minute on a CPU: every held-out text in one pass each (posterior),
    # a few hundred with draws (nelbo)
    default = None if clf.readout == "posterior" else CALIBRATION_TEXTS // len(data_names) * len(data_names)
    if args.limit:
        val = data.balanced_subset(val, args.limit)
    elif default and default < len(val) and min(np.bincount([r.label for r in val])) >= default // len(data_names):
        val = data.balanced_subset(val, default)
    if rank == 0:
        print(f"--calibrate: scoring {len(val)} held-out validation texts ({clf.readout} readout"
              + ("" if args.limit or clf.readout == "posterior" else "; --limit N scores more") + ")", file=sys.stderr)
    labels = np.array([r.label for r in val])
    scores = clf.class_scores_encoded(data.encode([r.text for r in val]), progress=True)
    if rank > 0:
        return
    try:
        records = fit_calibrations(clf, paths, scores, [r.text for r in val], labels)
    except ValueError as e:
        raise data.DataError(f"--calibrate: {e}") from None
    for record in records:
        before, after = record["before"], record["after"]
        fitted = (f"temperature {record['temperature']:.4g}" if "temperature" in record else
                  f"ensemble weights {record['weights'][0]:.4g} (MDLM), {record['weights'][1]:.4g} (NB-LR), "
                  f"bias {', '.join(f'{b:.3g}' for b in record['bias'])}")
        print(f"{record['estimator']}: {fitted} fitted on {len(val)} held-out validation texts (accuracy "
              f"{record['accuracy']:.4f}): NLL {before['nll']:.4f} -> {after['nll']:.4f} nats/text, "
              f"ECE {before['ece']:.4f} -> {after['ece']:.4f}")
    print(f"written to {calibration.FILE} in {', '.join(paths)}")


def fit_calibrations(clf: DiffusionClassifier, paths: list[str], mdlm_scores: np.ndarray, texts: list[str],
                     labels: np.ndarray) -> list[dict]:
    """Fit, on held-out labeled texts never trained on, the MDLM's temperature and, where the
    checkpoints hold an n-gram model, its temperature and the ensemble's weights
    (calibration.fit_ensemble); write each to calibration.json (calibration.write_fit) under its
    scoring key, set them on `clf`, and return the records (each with the NLL and ECE before and
    after). mdlm_scores float [N, C] (class_scores_encoded), labels int [N]. Raises ValueError for
    fewer than 2 texts."""
    mdlm_key = calibration.scoring_key(clf.readout, clf.estimator)
    common = {"n_texts": len(labels), "mc_samples": clf.mc_samples, "max_draws": clf.most_draws()}

    def record(key, logits, fitted, uncalibrated_logits=None):
        before = calibration.summary(logits if uncalibrated_logits is None else uncalibrated_logits, labels, 1.0)
        after = calibration.summary(logits, labels, fitted.get("temperature", 1.0))
        return {**fitted, "checkpoints": calibration.calibration_key(paths, ngram=calibration.uses_ngram(key)),
                "estimator": key, "accuracy": float(np.mean(logits.argmax(1) == labels)), **common,
                "before": before, "after": after}

    records = [record(mdlm_key, -mdlm_scores, {"temperature": calibration.fit_temperature(-mdlm_scores, labels)})]
    if clf.ngram is not None:
        features = clf.components(mdlm_scores, texts)
        records.append(record("ngram", features[:, 1], {"temperature": calibration.fit_temperature(features[:, 1],
                                                                                                   labels)}))
        weights, bias = calibration.fit_ensemble(features, labels)
        records.append(record(calibration.ensemble_key(mdlm_key), calibration.ensemble_logits(features, weights, bias),
                              {"weights": weights.tolist(), "bias": bias.tolist()},
                              calibration.ensemble_logits(features, np.ones(2), np.zeros(len(clf.classes)))))
    for r in records:
        calibration.write_fit(paths, r)
    temperature = records[0]["temperature"]
    clf.temperature, clf.temperature_source = temperature, f"T = {temperature:.4g} (fitted)"
    if clf.ngram is not None:
        fitted = records[2]["weights"]
        clf.set_ngram(clf.ngram, clf.combine, (records[1]["temperature"], f"T = {records[1]['temperature']:.4g} (fitted)"),
                      (np.asarray(fitted), np.asarray(records[2]["bias"]),
                       f"w = {fitted[0]:.3g} (MDLM), {fitted[1]:.3g} (NB-LR) (fitted)"))
    return records


def trained_on(paths: list[str]) -> dict:
    """{"n_labeled", "n_unlabeled", "labeled_limit", "unlabeled", "init"}: the training texts of the
    checkpoints, summed over per-class models, whether unlabeled texts were trained on, and the
    starting weights (train.py --init: scratch, hf, or a folder such as a base) (config.json; a
    --labeled-limit checkpoint written before the counts were recorded: its limit, n_unlabeled
    None; None where unknown)."""
    metas = [read_config(Path(p))[1] for p in paths]
    train_args = metas[0].get("train_args", {})
    limit = train_args.get("labeled_limit")
    counts = [m.get("n_labeled", limit) for m in metas]
    unlabeled = [m.get("n_unlabeled") for m in metas]
    return {"n_labeled": None if None in counts else sum(counts), "labeled_limit": limit,
            "unlabeled": train_args.get("unlabeled"),
            "n_unlabeled": None if None in unlabeled else sum(unlabeled), "init": train_args.get("init")}


def read_texts(path: str, text_field: str = "text") -> tuple[list[str], list]:
    """--novelty-data: (texts, ids) of a .jsonl/.csv file (the `text_field` of every row, labels
    not needed; ids = positions from 0) or, as --input, of a text file or folder (read_input).
    Raises DataError naming the file and line of a row without text."""
    if Path(path).suffix.lower() not in (".jsonl", ".csv") or not Path(path).is_file():
        return read_input(path)
    reader = data.jsonl_rows if Path(path).suffix.lower() == ".jsonl" else data.csv_rows
    rows = [(where, text) for where, text, _ in reader(Path(path), text_field, None)]
    for where, text in rows:
        if not isinstance(text, str) or not text.strip():
            raise data.DataError(f"{where}: no text in field {text_field!r} (set --text-field)")
    if not rows:
        raise data.DataError(f"{path}: no texts")
    return [text for _, text in rows], list(range(len(rows)))


def score_novelty(clf: DiffusionClassifier, other_path: str | None, tokens: list[list[int]], post: np.ndarray,
                  args) -> tuple[np.ndarray, dict]:
    """--novelty: the novelty of the scored texts (DiffusionClassifier.novelty), float64 [N] nats/token,
    and its summary; with other_path (--novelty-data) also those texts' novelty and posteriors, and
    the AUROC (calibration.auroc) of telling them from the scored texts by the novelty score and by
    the usual baseline, one minus the max posterior (post: the scored texts' posteriors [N, C])."""
    novelty = clf.novelty_encoded(tokens, progress=True, draws=args.novelty_draws)
    summary = {"mean_nats_per_token": float(novelty.mean())}
    if other_path:
        texts, ids = read_texts(other_path, args.text_field)
        other_tokens = data.encode(texts)
        other = clf.novelty_encoded(other_tokens, progress=True, draws=args.novelty_draws)
        # the same classifier as the scored texts' posteriors: the ensemble's (or NB-LR's) where that is the readout
        other_mdlm = None if clf.combine == "ngram" else np.nanmean(clf.draws(other_tokens, progress=True), -1)
        other_post = posteriors(clf.combined_scores(other_mdlm, texts), clf.temperature)
        summary.update(data=other_path, n_other=len(texts), other_mean_nats_per_token=float(other.mean()),
                       auroc={"novelty": calibration.auroc(novelty, other),
                              "max_posterior": calibration.auroc(-post.max(1), -other_post.max(1))},
                       other=[{"id": i, "novelty_nats_per_token": round(float(n), 4),
                               "max_posterior": round(float(m), 6), "n_tokens": len(t)}
                              for i, n, m, t in zip(ids, other, other_post.max(1), other_tokens)])
    return novelty, summary


def text_id(review: data.Review, names: list[str], args) -> str | int:
    """Where a user finds a labeled text: IMDB, its file inside aclImdb (split/label/<id>_<rating>.txt);
    any other dataset, its position in the file (folder: in class, then name order), from 0."""
    if review.rating:  # only IMDB reviews carry a rating
        return f"{args.split}/{names[review.label]}/{review.id}_{review.rating}.txt"
    return review.id


def parse_args(argv=None):
    """classify.py's command line -> (its parser, for later usage errors; the arguments, with .paths:
    the checkpoint folders in class order)."""
    p = ArgumentParser(description=__doc__,
                       usage="%(prog)s --ckpt DIR [--ckpt DIR ...] [options]   (--help-all: every flag)")
    p.add_argument("--ckpt0", metavar="DIR", help="checkpoint folder of class 0's model (IMDB: neg)")
    p.add_argument("--ckpt1", metavar="DIR", help="checkpoint folder of class 1's model (IMDB: pos)")
    p.add_argument("--ckpt", action="append", default=[], metavar="DIR",
                   help="one joint checkpoint (train.py --class all), "
                        "or class checkpoints in class order (repeat for N classes)")
    advanced = add_scoring_args(p, mc_samples=2, estimators=ESTIMATORS)
    advanced.add_argument("--max-draws", type=data.positive(),
                          help="sequential scoring: a text whose margin is within --z "
                          "standard errors of 0 gets more rounds of K draws, up to this many (None: 4 K; K = fixed K)")
    advanced.add_argument("--z", type=data.positive(float), default=2.0,
                          help="sequential scoring: stop a text once its "
                          "margin exceeds z standard errors")
    advanced.add_argument("--novelty-draws", type=data.positive(), default=NOVELTY_DRAWS,
                          help="--novelty: Monte-Carlo draws per text (fewer: faster and noisier)")
    p.add_argument("--readout", choices=("ensemble",) + READOUTS + ("ngram",),
                   help="ensemble: the MDLM and the n-gram model train.py fits beside it, combined with weights "
                   "fitted by --calibrate (the default where a checkpoint has both); ngram: NB-LR alone; "
                   "posterior (the MDLM alone): one forward pass per window, p(label | text) at the masked "
                   "label slot (a joint checkpoint's); nelbo (the MDLM alone): Bayes rule over the class NELBOs "
                   "(per-class models')")
    p.add_argument("--calibrate", action="store_true",
                   help="fit the posterior temperatures (the MDLM's, the n-gram model's) and the ensemble's weights "
                        "on the training data's held-out validation texts (--limit N of "
                        f"them; default: all for the posterior readout, {CALIBRATION_TEXTS} for the nelbo readout), "
                        "store it with the checkpoints (calibration.json) and exit; later runs use it")
    p.add_argument("--novelty", action="store_true",
                   help="also score how unlike the training texts each text is: its NELBO with the label unknown, "
                        "nats/token (DiffusionClassifier.novelty)")
    p.add_argument("--novelty-data", metavar="FILE",
                   help="texts of another kind (a .jsonl/.csv dataset, labels ignored; or one text per line, "
                        "or a folder of .txt): report the AUROC of telling the scored texts from these by novelty "
                        "and by max posterior (implies --novelty)")
    p.add_argument("--json", metavar="FILE",
                   help="write the summary and one row per text (id, text, label, prediction, "
                   "posterior, scores) here")
    args = p.parse_args(argv)
    args.paths = [x for x in (args.ckpt0, args.ckpt1) if x] + args.ckpt
    if not args.paths:
        p.error("give one joint checkpoint (--ckpt DIR) or one per class "
                "(--ckpt0 A --ckpt1 B, or --ckpt A --ckpt B ...)")
    if args.input and (args.limit or args.test_data):  # they pick labeled texts; --input's are all scored
        p.error(f"argument --input: scores every text of {args.input}; "
                "--limit and --test-data select labeled texts instead")
    if args.max_draws and args.max_draws % args.mc_samples:
        p.error(f"argument --max-draws: {args.max_draws} is not a multiple of --mc-samples {args.mc_samples}")
    return p, args


def texts_to_score(args, names: list[str]) -> tuple[list[str], list, np.ndarray | None]:
    """(texts, their ids, labels: long [N] indexing the checkpoints' class names `names`, or None for
    --input's texts). Raises DataError for a labeled class without a checkpoint."""
    if args.input:
        return *read_input(args.input), None
    reviews, data_names = labeled_texts(args)
    unknown = [n for n in data_names if n not in names]
    if unknown:
        raise data.DataError(f"{args.test_data or args.data}: class {unknown[0]!r} has no checkpoint "
                             f"(the checkpoints are {', '.join(names)})")
    labels = np.array([names.index(data_names[r.label]) for r in reviews])
    return [r.text for r in reviews], [text_id(r, data_names, args) for r in reviews], labels


def score_in_slices(clf: DiffusionClassifier, tokens: list[list[int]], args, rank: int,
                    world: int) -> tuple[np.ndarray, np.ndarray]:
    """Every text's draws, float64 [N, C, clf.most_draws()] (NaN where not drawn), and the indices
    scored (sorted): all of them, or after Ctrl-C (rank 0, past the first slice) those done so far.
    Slices in a seeded random order, so that an interrupted run keeps a fair sample of the texts;
    a text's draws depend on its index alone, not on its slice."""
    draws = np.full((len(tokens), len(clf.classes), clf.most_draws()), np.nan)
    order, size = np.random.default_rng(args.seed).permutation(len(tokens)), SLICE_BATCHES * args.batch_size * world
    done = 0
    bar = progress_bar(len(tokens), "scoring", "text", disable=rank > 0)
    try:
        for done in range(0, len(tokens), size):
            part = order[done:done + size]
            draws[part] = clf.draws([tokens[i] for i in part], index=part)
            bar.update(len(part))
        done = len(tokens)
    except KeyboardInterrupt:
        if rank > 0 or not done:
            raise
    bar.close()
    return draws, np.sort(order[:done])


@dataclasses.dataclass
class Scored:
    """The scored texts, in input order, and what the CLI reports of each: scores float64 [N, C] nats
    (DiffusionClassifier.class_scores: the class NELBOs, or -log p(c | text) under the posterior
    readout), post [N, C] (temperature applied), pred long [N], margin and margin_se [N]
    (scoring.paired_margin), n_draws [N], novelty [N] or None."""
    texts: list
    ids: list
    tokens: list
    labels: np.ndarray | None
    scores: np.ndarray
    post: np.ndarray
    pred: np.ndarray
    margin: np.ndarray
    margin_se: np.ndarray
    n_draws: np.ndarray
    components: np.ndarray | None = None  # float64 [N, 2, C]: log p_MDLM(c | x), log p_NB-LR(c | x) (an ensemble)
    novelty: np.ndarray | None = None

    @classmethod
    def of(cls, clf: "DiffusionClassifier", texts, ids, tokens, labels, draws: np.ndarray, kept: np.ndarray,
           ngram_log_proba: np.ndarray | None = None) -> "Scored":
        """draws: the MDLM's [N, C, D] (score_in_slices; unused under the n-gram readout), kept: the
        indices scored; ngram_log_proba [N, C]: the n-gram model's log p(c | text), where it has one."""
        kept_texts = [texts[i] for i in kept]
        ngram = None if ngram_log_proba is None else ngram_log_proba[kept]
        mdlm = np.nanmean(draws[kept], -1)
        scores = clf.combined_scores(mdlm, kept_texts, ngram)
        post = posteriors(scores, clf.temperature)
        if clf.combine == "mdlm":
            margin, margin_se = paired_margin(draws[kept])
        else:  # the gap of the combined scores; no draws to give it an error
            ordered = np.sort(scores, 1)
            margin, margin_se = ordered[:, 1] - ordered[:, 0], np.full(len(kept), np.nan)
        components = clf.components(mdlm, kept_texts, ngram) if clf.combine == "ensemble" else None
        return cls(kept_texts, [ids[i] for i in kept], [tokens[i] for i in kept],
                   None if labels is None else labels[kept], scores, post, post.argmax(1), margin, margin_se,
                   draws_taken(draws[kept]), components)


def summarise(args, clf: DiffusionClassifier, s: Scored, seconds: float, total: int, world: int) -> dict:
    """The run's summary (what --json holds above its rows): settings, speed, the training texts of
    the checkpoints, and with labels the accuracy, confusion matrix, calibration and (nelbo readout)
    the mean nats/token under each class on each true class."""
    names, max_len = clf.classes, clf.models[0].config.model_length
    summary = {"partial": len(s.texts) < total, "n_texts": len(s.texts), "n_texts_asked": total, "classes": names,
               "checkpoints": args.paths, "mc_samples": args.mc_samples, "max_draws": clf.most_draws(), "z": args.z,
               "mean_draws": float(s.n_draws.mean()), "readout": clf.readout_name, "mdlm_readout": clf.readout,
               "estimator": args.estimator,
               "temperature": clf.temperature, "temperature_source": clf.temperature_source, "seed": args.seed,
               "device": str(clf.device), "processes": world, "seconds": seconds, "texts_per_s": len(s.texts) / seconds,
               "windowed_texts": sum(len(t) > max_len for t in s.tokens), "max_len": max_len,
               **trained_on(args.paths)}  # what the model learned from: the learning curve's x (plot.py)
    if s.labels is None:
        return {**summary, "input": args.input}
    summary.update(data=args.test_data or args.data, split=None if args.test_data else args.split, limit=args.limit)
    summary.update(accuracy_report(s.labels, s.pred, names))
    uncalibrated = -s.scores  # the ensemble's: the plain product of the two posteriors (w = 1, 1; b = 0)
    if s.components is not None:
        uncalibrated = calibration.ensemble_logits(s.components, np.ones(2), np.zeros(len(names)))
        summary["ensemble"] = {"weights": clf.ensemble_weights.tolist(), "bias": clf.ensemble_bias.tolist()}
        summary["components"] = {}
        for m, name in enumerate(("mdlm", "ngram")):  # each component alone on the same texts
            log_p, (temperature, source) = s.components[:, m], clf.components_[name]
            summary["components"][name] = {
                **accuracy_report(s.labels, log_p.argmax(1), names), "temperature_source": source,
                "calibration": {"uncalibrated": calibration.summary(log_p, s.labels, 1.0),
                                "calibrated": calibration.summary(log_p, s.labels, temperature)}}
    summary["calibration"] = {"uncalibrated": calibration.summary(uncalibrated, s.labels, 1.0),
                              "calibrated": calibration.summary(-s.scores, s.labels, clf.temperature)}
    if clf.readout_name == "nelbo":  # the evidence behind the confusion matrix
        summary["nats_per_token"] = {names[c]: {names[m]: float(s.scores[s.labels == c, m].sum() / sum(
            len(s.tokens[i]) for i in np.flatnonzero(s.labels == c))) for m in range(len(names))}
            for c in np.unique(s.labels)}
    return summary


def print_rows(s: Scored, summary: dict, names: list[str]) -> None:
    """--input: one tab-separated line per text (id, class, its posterior, novelty, the text's start)."""
    print(f"{len(s.texts)} texts from --input {summary['input']}; {summary['windowed_texts']} longer than "
          f"{summary['max_len']} tokens scored whole in windows; posteriors {summary['temperature_source']}",
          file=sys.stderr)
    print("id\tclass\tposterior\t" + ("" if s.novelty is None else "novelty (nats/token)\t") + "text")
    for n, (i, c, pr, text) in enumerate(zip(s.ids, s.pred, s.post, s.texts)):
        score = "" if s.novelty is None else f"{s.novelty[n]:.4f}\t"
        print(f"{i}\t{names[c]}\t{pr[c]:.4f}\t{score}{' '.join(text[:70].split())}")


def print_report(summary: dict, args) -> None:
    """Labeled texts: accuracy with its interval, the confusion matrix, precision and recall per
    class, (nelbo readout) nats/token per class, and the posteriors' NLL and ECE before and after T."""
    names, low, high = summary["classes"], *summary["accuracy_ci95"]
    if summary["mdlm_readout"] == "posterior":
        draws_note = "posterior readout (one pass per window)"
    elif summary["max_draws"] == args.mc_samples:
        draws_note = f"K={args.mc_samples} ({args.estimator})"
    else:
        draws_note = (f"{summary['mean_draws']:.2f} draws/text (rounds of {args.mc_samples} up to "
                      f"{summary['max_draws']}, z={args.z:g}) ({args.estimator})")
    if summary["readout"] == "ngram":
        draws_note = "ngram readout (NB-LR on word uni+bigrams alone)"
    elif summary["readout"] == "ensemble":
        w = summary["ensemble"]["weights"]
        mdlm_note = draws_note.replace("posterior readout (", "posterior, ").rstrip(")") if \
            summary["mdlm_readout"] == "posterior" else f"nelbo, {draws_note}"
        draws_note = f"ensemble readout: {w[0]:.3g} x log p_MDLM ({mdlm_note}) + {w[1]:.3g} x log p_NB-LR"
    n, total = summary["n_texts"], summary["n_texts_asked"]
    scope = f"{n} texts" + (f" (PARTIAL: a random {n} of {total})" if summary["partial"] else "")
    print(f"accuracy {summary['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}) on {scope} "
          f"({args.test_data or f'{args.split} split'}), {draws_note}, {summary['texts_per_s']:.1f} texts/s on "
          f"{summary['device']}; {summary['windowed_texts']} texts longer than {summary['max_len']} tokens "
          "scored in windows")
    print("confusion matrix (rows true, columns predicted): " + ", ".join(names))
    for c, row in enumerate(summary["confusion_matrix"]):
        print(f"  {names[c]:>8} " + " ".join(f"{v:6d}" for v in row))
    for c, d in summary["per_class"].items():
        print(f"  {c}: precision {d['precision']:.4f} recall {d['recall']:.4f}")
    for c, row in summary.get("nats_per_token", {}).items():
        print(f"  true {c}: nats/token under " + ", ".join(f"{m} {v:.4f}" for m, v in row.items()))
    cal = summary["calibration"]
    print(f"posteriors: NLL {cal['uncalibrated']['nll']:.4f} -> {cal['calibrated']['nll']:.4f} nats/text, "
          f"ECE ({calibration.ECE_BINS} bins) {cal['uncalibrated']['ece']:.4f} -> {cal['calibrated']['ece']:.4f}; "
          f"{summary['temperature_source']}")
    for name, c in summary.get("components", {}).items():  # the ensemble's components alone, on the same texts
        low, high = c["accuracy_ci95"]
        cal = c["calibration"]
        label = f"MDLM ({summary['mdlm_readout']})" if name == "mdlm" else "NB-LR"
        print(f"  alone, {label}: accuracy {c['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}), confusion "
              + " / ".join(" ".join(map(str, row)) for row in c["confusion_matrix"])
              + f", ECE {cal['uncalibrated']['ece']:.4f} -> {cal['calibrated']['ece']:.4f} ({c['temperature_source']})")


def print_novelty(novelty: dict, n_texts: int, other_path: str | None) -> None:
    """--novelty: the mean novelty, and with --novelty-data the other texts' and both AUROCs."""
    line = (f"novelty (NELBO with the label unknown, nats/token): mean {novelty['mean_nats_per_token']:.4f} "
            f"over the {n_texts} texts")
    if other_path:
        auc = novelty["auroc"]
        line += (f"; {novelty['n_other']} texts of --novelty-data {other_path}: mean "
                 f"{novelty['other_mean_nats_per_token']:.4f}; AUROC of telling them apart: novelty "
                 f"{auc['novelty']:.4f}, max posterior {auc['max_posterior']:.4f}")
    print(line)


def json_rows(s: Scored, names: list[str], readout: str) -> list[dict]:
    """--json: one record per scored text; an ensemble's also each component's log-posterior."""
    parts = [{} if s.components is None else {"mdlm_log_posterior": s.components[i, 0].round(4).tolist(),
                                              "ngram_log_posterior": s.components[i, 1].round(4).tolist()}
             for i in range(len(s.texts))]
    return [{"id": s.ids[i], "text": s.texts[i], "label": None if s.labels is None else names[s.labels[i]],
             "pred": names[s.pred[i]], "posterior": s.post[i].round(6).tolist(),
             {"nelbo": "nelbo", "ensemble": "score"}.get(readout, "neg_log_posterior"): s.scores[i].round(4).tolist(),
             **parts[i],
             "margin": round(float(s.margin[i]), 4),
             "margin_se": None if np.isnan(s.margin_se[i]) else round(float(s.margin_se[i]), 4),
             "draws": int(s.n_draws[i]), "n_tokens": len(s.tokens[i]),
             **({} if s.novelty is None else {"novelty_nats_per_token": round(float(s.novelty[i]), 4)})}
            for i in range(len(s.texts))]


def run(argv=None):
    """classify.py: parse, check what is needed from outside, load, (--calibrate: fit T and stop),
    read the texts, score them, summarise, print, write --json."""
    p, args = parse_args(argv)
    if not args.input:  # labeled texts to read: the checkpoint's own training data unless --data says otherwise
        checkpoint_data(args, args.paths)
    # what this command needs from outside, all checked before any model or data is loaded
    sources = [(args.data, "--data")] if args.calibrate or not (args.input or args.test_data) else []
    sources += [(path, flag) for path, flag in ((args.test_data, "--test-data"), (args.novelty_data, "--novelty-data"))
                if path and not args.calibrate]
    preflight([data.get_tokenizer] + [lambda p=p, f=f: data.check_source(p, f) for p, f in sources], (data.DataError,))
    rank, world, device = init_distributed()
    if world > 1 and (args.novelty or args.novelty_data):
        p.error("argument --novelty: runs in one process (not under torchrun)")
    try:
        clf = DiffusionClassifier.from_checkpoints(args.paths, device, args.mc_samples, args.seed, args.batch_size,
                                                   args.estimator, args.max_draws, args.z, args.precision, args.readout)
    except PrecisionError as e:
        p.error(f"argument --precision: {e}")
    if args.calibrate:
        calibrate(args, clf, args.paths, rank)
        return
    texts, ids, labels = texts_to_score(args, clf.classes)
    tokens = data.encode(texts)
    start = time.perf_counter()
    if clf.combine == "ngram":  # NB-LR alone: the MDLM is not run
        draws, kept = np.zeros((len(tokens), len(clf.classes), 1)), np.arange(len(tokens))
    else:
        draws, kept = score_in_slices(clf, tokens, args, rank, world)
    if rank > 0:  # every rank holds every result (score_draws gathers them); rank 0 reports
        return
    ngram = clf.ngram.log_proba(texts) if clf.combine != "mdlm" else None
    seconds = time.perf_counter() - start
    scored = Scored.of(clf, texts, ids, tokens, labels, draws, kept, ngram)
    summary = summarise(args, clf, scored, seconds, len(texts), world)
    if args.novelty or args.novelty_data:
        scored.novelty, summary["novelty"] = score_novelty(clf, args.novelty_data, scored.tokens, scored.post, args)
        summary["novelty"]["draws"] = args.novelty_draws
    if labels is None:
        print_rows(scored, summary, clf.classes)
    else:
        print_report(summary, args)
    if "novelty" in summary:
        print_novelty(summary["novelty"], len(scored.texts), args.novelty_data)
    if args.json:
        summary["texts"] = json_rows(scored, clf.classes, clf.readout_name)
        atomic_write(Path(args.json), lambda f: f.write_text(json.dumps(summary, indent=1)))
    if summary["partial"]:
        done = len(scored.texts)
        written = (f"; the {done} texts scored so far are above{' and in ' + args.json if args.json else ''} "
                   "(marked partial)")
        fail(f"interrupted after {done} of {len(texts)} texts{written}", 130)


def main(argv=None):
    run_cli(run, argv, (CheckpointError, data.DataError, ScoringError))


if __name__ == "__main__":
    main()
