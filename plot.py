"""Pictures of measured runs (matplotlib, an optional extra: pip install ".[plots]", or matplotlib).

    python plot.py ckpt/neg ckpt/pos curve.json results.json --out plots

Each PATH is recognised by its content:
  a training run folder (train.py --out; its log.jsonl)  -> training.png: the training loss (faint,
      with its running mean) and the validation NELBO, in nats/token, against the step; every run
      given goes onto this one figure, named by its folder;
  a `variance.py --curve --json` file                    -> accuracy_vs_draws.png (<stem>_accuracy_vs_draws.png
      when several): accuracy with its 95% interval against the mean draws per text (forward passes
      per text and class), fixed K joined by a line, each sequential setting its own marker;
  a `classify.py --json` file                            -> <stem>_reliability.png: the reliability diagram of
      the posteriors it reports (accuracy per confidence bin against the diagonal, the bin counts
      beneath) and their ECE, over the texts that have a label; with --novelty-data, also
      <stem>_novelty.png: histograms of the novelty score (nats/token) of its texts and of the others;
  a `baselines.py --json` file                           -> a point of learning_curve.png;
  an `eval.py --by-t --json` file                        -> <stem>_by_t.png: the cross-entropy per masked token
      against the masking rate t, one line per checkpoint, beside the unigram and bigram models of
      the same texts (an eval.py JSON without --by-t has nothing to draw: said, and skipped).
learning_curve.png: accuracy (95 % Wilson intervals) against the number of labeled training texts,
log axis, one line per model: every labeled classify.py JSON whose checkpoint records its labels,
split by whether it trained on unlabeled texts, and every baselines.py JSON (several --seed draws
of one size: their mean, the interval of one draw). Drawn when there is a baselines JSON or two
classify JSONs of train.py --labeled-limit checkpoints.
"""
import json
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np

from cli import ArgumentParser

SMOOTH = 25  # steps in the running mean of the training loss: one step's loss is one batch's, noisy
BINS = 15  # reliability bins over [1/C, 1], as many as calibration.ECE_BINS (over (0, 1])


class InputError(Exception):
    """A file that is not what plot.py reads; the message names it."""


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), or a one-line exit without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plot.py needs matplotlib: pip install matplotlib")
    return plt


def read_input(path: str) -> tuple[str, object]:
    """("run", training_series) | ("curve", JSON) | ("classify", JSON), by content; InputError otherwise."""
    log = Path(path, "log.jsonl")
    if log.is_file():
        return "run", training_series(log)
    if not Path(path).exists():
        raise InputError(f"{path}: no such file or folder")
    doc = None
    try:
        text = Path(path).read_text() if Path(path).is_file() else ""
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{"):  # meant to be one of the JSON files: say where it breaks
            raise InputError(f"{path} line {e.lineno}: not JSON ({e.msg})") from None
    except UnicodeDecodeError:
        pass  # not text: none of the three (below)
    if isinstance(doc, dict) and "rows" in doc:
        return "curve", doc
    if isinstance(doc, dict) and "results" in doc and "checkpoints" in doc:  # before "texts": eval.py's has them too
        return "eval", doc
    if isinstance(doc, dict) and "texts" in doc:
        return "classify", doc
    if isinstance(doc, dict) and "models" in doc and "n_train" in doc:
        return "baselines", doc
    raise InputError(f"{path}: not a run folder (log.jsonl), a variance.py --curve JSON, a classify.py --json, an "
                     "eval.py --json or a baselines.py --json file")


def training_series(log: Path) -> dict:
    """A train.py log.jsonl -> {"train": (steps, training NELBO), "val": (steps, validation NELBO)}, nats/token, arrays."""
    train, val = [], []
    for number, line in enumerate(log.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            if "loss" in row:  # step-0 rows are validation only; a row can carry both
                train.append((float(row["step"]), float(row["loss"])))
            if "val_nats_per_token" in row:
                val.append((float(row["step"]), float(row["val_nats_per_token"])))
        except json.JSONDecodeError as e:
            raise InputError(f"{log} line {number}: not JSON ({e.msg})") from None
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{log} line {number}: not a train.py log row: {line[:80]}") from None
    return {"train": tuple(np.array(train).reshape(-1, 2).T), "val": tuple(np.array(val).reshape(-1, 2).T)}


def running_mean(values: np.ndarray, window: int = SMOOTH) -> np.ndarray:
    """Mean of each value and the window - 1 before it (fewer at the start): float [N] -> float [N]."""
    total = np.concatenate([[0.0], np.cumsum(values)])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - window, 0)
    return (total[end] - total[start]) / (end - start)


def curve_points(doc: dict) -> tuple[list, list]:
    """The rows of a variance.py --curve JSON -> (fixed K, sequential): lists of (setting, mean draws
    per text, accuracy, 95% low, 95% high); fixed K sorted by draws. A setting is fixed when K = its maximum."""
    points = [(r["setting"], r["mean_draws"], r["accuracy"], *r["accuracy_ci95"]) for r in doc["rows"]]
    fixed = sorted((p for p, r in zip(points, doc["rows"]) if r["k"] == r["max_draws"]), key=lambda p: p[1])
    return fixed, [p for p, r in zip(points, doc["rows"]) if r["k"] != r["max_draws"]]


def labeled_posteriors(doc: dict, path: str) -> tuple[np.ndarray, np.ndarray]:
    """A classify.py --json file -> (posteriors float [N, C], labels int [N]) of its texts that have a
    label (an index into "classes" or a class name); InputError if none has one."""
    classes = doc["classes"]
    rows = [(t["posterior"], t["label"]) for t in doc["texts"] if t.get("label") is not None]
    for label in {label for _, label in rows} - set(range(len(classes))) - set(classes):  # the first unknown one
        raise InputError(f"{path}: label {label!r} is neither a class name of {classes} nor an index into them")
    rows = [(probs, classes.index(label) if isinstance(label, str) else int(label)) for probs, label in rows]
    if not rows:
        raise InputError(f"{path}: no text has a label; a reliability diagram needs labeled texts")
    probs, labels = zip(*rows)
    return np.array(probs, dtype=float), np.array(labels)


def reliability(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Per confidence bin (BINS equal-width bins of [1/C, 1], right-closed as calibration.ece's):
    "edges" [BINS + 1], "count", "accuracy" and mean "confidence" [BINS] (NaN where empty), and the
    "ece" over these same bins, the ones drawn (classify.py's, calibration.ece, bins (0, 1] instead, of
    which only those above 1/C can hold a text: the two numbers differ). probs [N, C], labels int [N]."""
    low = 1 / probs.shape[1]  # the max of C probabilities is never below 1/C
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    bins = np.clip(np.ceil((confidence - low) / (1 - low) * BINS).astype(int) - 1, 0, BINS - 1)
    count = np.bincount(bins, minlength=BINS)
    with np.errstate(invalid="ignore"):  # empty bins: 0 / 0 = NaN, drawn as nothing
        accuracy, mean = np.bincount(bins, correct, BINS) / count, np.bincount(bins, confidence, BINS) / count
    return {"edges": np.linspace(low, 1, BINS + 1), "count": count, "accuracy": accuracy, "confidence": mean,
            "ece": float(np.nansum(count / count.sum() * np.abs(accuracy - mean)))}


def learning_points(classify_docs: list[dict], baseline_docs: list[dict]) -> dict:
    """Series name -> sorted [(labels, accuracy, 95% low, 95% high)]: classify.py JSONs with a
    known n_labeled (our model; ", no unlabeled texts" when n_unlabeled is 0; ", from a base" when
    its --init was a checkpoint folder; an ensemble's JSON gives three series: the ensemble, its MDLM
    and its NB-LR, each alone on the same texts), and each model of the
    baselines.py JSONs (the mean accuracy over the JSONs of one size, the Wilson interval of that
    mean over one test set)."""
    from calibration import wilson_interval
    series = {}
    for doc in classify_docs:
        if doc.get("n_labeled") is None or "accuracy" not in doc:  # unknown labels, or unlabeled texts (--input)
            continue
        kind = "MDLM, label token" if len(doc.get("checkpoints", [])) <= 1 else "MDLMs, one per class"
        unlabeled = doc.get("unlabeled", bool(doc.get("n_unlabeled")) if doc.get("n_unlabeled") is not None else None)
        name = kind + {True: " + unlabeled texts", False: ", no unlabeled texts", None: ""}[unlabeled]
        if doc.get("init") not in (None, "scratch", "hf", "auto"):  # fine-tuned from a local checkpoint: a base
            name = kind + ", from a base of p(text)"  # the base read the unlabeled texts, whatever the fine-tune did
        if doc.get("readout") == "ensemble":  # one run, three classifiers: the ensemble and each component alone
            series.setdefault(name + " + NB-LR (ensemble)", []).append((doc["n_labeled"], doc["accuracy"],
                                                                         *doc["accuracy_ci95"]))
            for component, label in (("mdlm", name), ("ngram", "NB-LR (the ensemble's component)")):
                c = doc["components"][component]
                series.setdefault(label, []).append((doc["n_labeled"], c["accuracy"], *c["accuracy_ci95"]))
            continue
        if doc.get("readout") == "ngram":
            name = "NB-LR (the ensemble's component)"
        series.setdefault(name, []).append((doc["n_labeled"], doc["accuracy"], *doc["accuracy_ci95"]))
    runs = {}
    for doc in baseline_docs:
        for model, result in doc["models"].items():
            runs.setdefault((model, doc["n_train"], doc["n_test"]), []).append(result["accuracy"])
    for (model, n, n_test), accs in runs.items():
        acc = float(np.mean(accs))
        series.setdefault(model, []).append((n, acc, *wilson_interval(acc, n_test)))
    return {name: sorted(points) for name, points in series.items()}


def learning_figure(plt, series: dict):
    """Accuracy against labeled training texts (log axis), one line with 95% error bars per series."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, (name, points) in enumerate(series.items()):
        n, acc, low, high = (np.array(c, dtype=float) for c in zip(*points))
        ax.errorbar(n, acc, yerr=[acc - low, high - acc], fmt="o-" if name.startswith("MDLM") else "s--", capsize=3,
                    ms=6, lw=2 if name.startswith("MDLM") else 1, color=f"C{i}", label=name)
    ax.set_xscale("log")
    ax.set(xlabel="labeled training texts", ylabel="test accuracy", title="accuracy against labels (95% intervals)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def novelty_figure(plt, doc: dict, name: str):
    """Histograms of the novelty score (nats/token) of a classify.py --novelty-data JSON's own texts and
    of the other texts, on shared bins, with both AUROCs in the title."""
    nov = doc["novelty"]
    inside = np.array([t["novelty_nats_per_token"] for t in doc["texts"]], dtype=float)
    other = np.array([t["novelty_nats_per_token"] for t in nov["other"]], dtype=float)
    bins = np.linspace(min(inside.min(), other.min()), max(inside.max(), other.max()), 41)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.hist(inside, bins, alpha=0.6, density=True, label=f"the scored texts ({len(inside)})")
    ax.hist(other, bins, alpha=0.6, density=True, label=f"{'/'.join(Path(nov['data']).parts[-2:])} ({len(other)})")
    auc = nov["auroc"]
    ax.set(xlabel="novelty: NELBO with the label unknown (nats/token)", ylabel="density",
           title=f"{name}: novelty AUROC {auc['novelty']:.4f} (max posterior: {auc['max_posterior']:.4f})")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def by_t_figure(plt, doc: dict, name: str):
    """Cross-entropy per masked token against t, one line per checkpoint, from an eval.py --by-t JSON,
    with the unigram and bigram cross-entropies of the same texts as horizontal lines."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, ckpt in enumerate(dict.fromkeys(r["checkpoint"] for r in doc["by_t"])):
        rows = sorted((r["t"], r["nats_per_masked_token"], r["name"]) for r in doc["by_t"] if r["checkpoint"] == ckpt)
        ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", color=f"C{i}", label=rows[0][2])
    for value, style, label in [(doc["reference"]["unigram"], "--", "unigram"), (doc["reference"]["bigram"], ":", "bigram")]:
        ax.axhline(value, ls=style, color="k", lw=1, label=f"{label} counts model: {value:.3f}")
    ax.set(xlabel="masking rate t (the rest of the text visible)", ylabel="cross-entropy per masked token (nats)",
           title=f"{name}: does the model read its context? ({doc['results'][0]['n_texts']} texts)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def training_figure(plt, runs: list[tuple[str, dict]]):
    """One figure of every run's training loss and validation NELBO (nats/token) against the step; one colour per run."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (name, series) in enumerate(runs):
        steps, loss = series["train"]
        ax.plot(steps, loss, color=f"C{i}", lw=0.5, alpha=0.25)
        ax.plot(steps, running_mean(loss), color=f"C{i}", lw=1.5, label=f"{name}: training loss ({SMOOTH}-step mean)")
        ax.plot(*series["val"], color=f"C{i}", marker="o", mec="k", ms=7, ls="--", zorder=3, label=f"{name}: validation NELBO")
    ax.set(xlabel="step", ylabel="NELBO (nats/token)", title="training loss and validation NELBO")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def curve_figure(plt, doc: dict, name: str):
    """Accuracy (95% interval as error bars) against mean draws per text, from a variance.py --curve JSON."""
    fixed, sequential = curve_points(doc)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for points, fmt, label in [(fixed, "o-", "fixed K = " + ", ".join(f"{p[1]:g}" for p in fixed))] + \
            [([p], "sD^v<>p"[i % 7], p[0]) for i, p in enumerate(sequential)]:
        _, draws, acc, low, high = (np.array(c) for c in zip(*points))
        ax.errorbar(draws, acc, yerr=[acc - low, high - acc], fmt=fmt, capsize=3, ms=6, label=label)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="mean draws per text (forward passes per text and class)", ylabel="accuracy",
           title=f"{name}: accuracy vs draws, {doc.get('n_texts', '?')} texts, "
                 f"{doc.get('estimator', '?')} estimator (95% intervals)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


def reliability_figure(plt, doc: dict, name: str, path: str):
    """The reliability diagram of a classify.py --json file's posteriors, the bin counts beneath, the ECE in the title."""
    probs, labels = labeled_posteriors(doc, path)
    r = reliability(probs, labels)
    edges, width = r["edges"], r["edges"][1] - r["edges"][0]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7.5), sharex=True, height_ratios=(3, 1))
    top.bar(edges[:-1], r["accuracy"], width, align="edge", edgecolor="k", alpha=0.7, label="accuracy in the bin")
    top.plot(edges[:-1] + width / 2, r["confidence"], "r_", ms=14, mew=2, label="mean confidence in the bin")
    top.plot([edges[0], 1], [edges[0], 1], "k--", lw=1, label="perfect calibration")
    top.set(ylabel="accuracy", ylim=(0, 1), xlim=(edges[0], 1),
            title=f"{name}: reliability of the posteriors (T = {doc.get('temperature', 1):.4g})\n"
                  f"{len(labels)} labeled texts, ECE {r['ece']:.4f} (the {BINS} bins of [{edges[0]:.3g}, 1] below)")
    top.legend(loc="lower right")  # over the bars' feet, which carry no information
    bottom.bar(edges[:-1], r["count"], width, align="edge", edgecolor="k", color="0.6")
    for x, count in zip(edges[:-1] + width / 2, r["count"]):  # the numbers too: a bin of a few texts is a sliver
        bottom.text(x, count, str(count), ha="center", va="bottom", fontsize=7)
    bottom.set(ylim=(0, 1.3 * r["count"].max()), ylabel="texts",
               xlabel=f"confidence = max posterior ({BINS} bins of [{edges[0]:.3g}, 1])")
    return fig


def save(fig, path: Path) -> None:
    """Write fig as a PNG to a temporary name beside path, then rename (as convert_hf.atomic_write,
    without its torch import): a half-written PNG never appears under path."""
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    print(path)


def attempt(path: str, action):
    """action(), any failure on the input path (or the PNG it becomes) turned into a one-line exit naming the file."""
    try:
        return action()
    except InputError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: {e.filename or path}: {e.strerror}")
    except (KeyError, TypeError, IndexError, ValueError) as e:  # the right kind of file, a field missing or of a wrong type
        sys.exit(f"error: {path}: malformed ({type(e).__name__}: {e})")


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("paths", nargs="+", metavar="PATH", help="run folders, variance.py --curve JSONs, classify.py JSONs, eval.py JSONs, baselines.py JSONs")
    p.add_argument("--out", help="folder for the PNGs (default: the folder that holds the first PATH)")
    args = p.parse_args(argv)
    plt = pyplot()
    inputs = [(path, *attempt(path, partial(read_input, path))) for path in args.paths]
    runs = [(Path(path).resolve().name, series) for path, kind, series in inputs if kind == "run"]
    figures = [("training.png", " ".join(path for path, kind, _ in inputs if kind == "run"),
                partial(training_figure, plt, runs))] if runs else []
    curves = [(path, doc) for path, kind, doc in inputs if kind == "curve"]
    for path, doc in curves:
        name = "accuracy_vs_draws.png" if len(curves) == 1 else f"{Path(path).stem}_accuracy_vs_draws.png"
        figures.append((name, path, partial(curve_figure, plt, doc, Path(path).stem)))
    for path, doc in ((path, doc) for path, kind, doc in inputs if kind == "classify"):
        draw = partial(reliability_figure, plt, doc, Path(path).stem, path)
        figures.append((f"{Path(path).stem}_reliability.png", path, draw))
        if "other" in doc.get("novelty", {}):
            figures.append((f"{Path(path).stem}_novelty.png", path, partial(novelty_figure, plt, doc, Path(path).stem)))
    for path, doc in ((path, doc) for path, kind, doc in inputs if kind == "eval"):
        if "by_t" in doc:
            figures.append((f"{Path(path).stem}_by_t.png", path, partial(by_t_figure, plt, doc, Path(path).stem)))
        else:
            print(f"{path}: an eval.py JSON without --by-t: nothing to draw, skipped", file=sys.stderr)
    classified = [doc for _, kind, doc in inputs if kind == "classify"]
    base = [doc for _, kind, doc in inputs if kind == "baselines"]
    if base or sum(doc.get("labeled_limit") is not None and "accuracy" in doc for doc in classified) >= 2:
        series = attempt("the learning curve's inputs", partial(learning_points, classified, base))
        figures.append(("learning_curve.png", "the learning curve's inputs", partial(learning_figure, plt, series)))
    if len({name for name, _, _ in figures}) < len(figures):
        sys.exit("error: two inputs of one kind have the same file name stem: their PNGs would overwrite each other")
    out = Path(args.out) if args.out else Path(args.paths[0]).resolve().parent  # beside the inputs, not in the cwd
    attempt(str(out), partial(out.mkdir, parents=True, exist_ok=True))
    for name, path, draw in figures:
        fig = attempt(path, draw)
        attempt(path, partial(save, fig, out / name))
        plt.close(fig)


if __name__ == "__main__":
    main()
