"""How many Monte-Carlo draws a decision needs: the standard error of the paired NELBO difference
between a text's own class and its strongest rival, for K = 1, 2, 4, ... draws, under both NELBO
estimators of classify.py ("time": t ~ U, weight 1/t, Eq. 11 of Sahoo et al. 2024; "count":
k ~ U{1..n} masked tokens, weight n/k).

    python variance.py --ckpt ckpt/all --limit 32 --replicates 2 --json variance.json
    python variance.py --ckpt0 A --ckpt1 B --limit 1000 --curve --json curve.json   # accuracy vs draws

--curve measures what the draws buy instead: accuracy and mean draws per text (forward passes per
text and class) for fixed K in --ks, and for sequential scoring (scoring.score_sequential: rounds
of K up to a maximum, stopping a text once its margin exceeds z standard errors) in --sequential.

Texts: a balanced, seeded subset of the held-out validation texts of the training data (the 5% of
each class train.py never trains on; without --data, the data the first checkpoint was trained on).
For each K, `--replicates` independent K-draw estimates of each text (seeds 0, 1, ...) give the
variance of that text's difference; the table reports the root of its mean over texts (nats), and
that root divided by the mean |difference| (the noise-to-signal ratio: above ~0.5, the sign of the
difference, i.e. the decision, is often a coin flip).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

import classify
import data
from cli import ArgumentParser, checkpoint_data, run_cli
from convert_hf import CheckpointError, atomic_write
import scoring


def run(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", action="append", default=[], help="one conditional checkpoint, or one per class in class order")
    p.add_argument("--ckpt0", help="checkpoint of class 0 (then --ckpt1)")
    p.add_argument("--ckpt1", help="checkpoint of class 1")
    data.add_data_args(p, from_checkpoint=True)
    p.add_argument("--limit", type=data.positive(), default=32, help="held-out texts (balanced over classes; default 32)")
    p.add_argument("--ks", default="1,2,4,8,16", help="draw counts K to measure (default 1,2,4,8,16)")
    p.add_argument("--replicates", type=data.positive(), default=2, help="independent K-draw estimates per text (default 2)")
    p.add_argument("--batch-size", type=data.positive(), default=16, help="texts per forward pass, each with its K draws")
    p.add_argument("--curve", action="store_true", help="accuracy against mean draws per text, fixed K vs sequential")
    p.add_argument("--sequential", default="1:8,2:8,2:16,4:16",
                   help="--curve: sequential settings K:MAX (rounds of K draws up to MAX), comma-separated")
    p.add_argument("--z", type=data.positive(float), default=2.0, help="--curve: the sequential stopping threshold")
    p.add_argument("--json", help="write the table here")
    args = p.parse_args(argv)
    if args.replicates < 2:
        p.error("argument --replicates: a variance needs at least 2")
    try:
        ks = [int(k) for k in args.ks.split(",")]
        if min(ks) < 1:
            raise ValueError
    except ValueError:
        p.error(f"argument --ks: expected comma-separated positive integers, got {args.ks!r}")
    args.ckpt = [x for x in (args.ckpt0, args.ckpt1) if x] + args.ckpt
    if not args.ckpt:
        p.error("give --ckpt (repeat for one per class) or --ckpt0 A --ckpt1 B")
    try:
        sequential = [tuple(int(v) for v in setting.split(":")) for setting in args.sequential.split(",")]
        if any(len(s) != 2 or s[0] < 1 or s[1] % s[0] for s in sequential):
            raise ValueError
    except ValueError:
        p.error(f"argument --sequential: expected K:MAX pairs with MAX a multiple of K, got {args.sequential!r}")
    try:
        clf = classify.DiffusionClassifier.from_checkpoints(args.ckpt, batch_size=args.batch_size, readout="nelbo")
        checkpoint_data(args, args.ckpt)
        reviews, names = data.load_dataset(args.data, "train", args.text_field, args.label_field)
        val = data.balanced_subset(data.train_val_split(reviews)[1], args.limit)
    except (CheckpointError, data.DataError) as e:
        sys.exit(f"error: {e}")
    tokens, labels = data.encode([r.text for r in val]), np.array([r.label for r in val])
    if args.curve:
        return curve(args, clf, tokens, labels, ks, sequential)
    rows = []
    for estimator in scoring.ESTIMATORS:
        clf.estimator = estimator
        for k in ks:
            clf.mc_samples = clf.max_draws = k  # fixed K
            runs = []
            for r in range(args.replicates):
                clf.seed = r
                runs.append(clf.class_scores_encoded(tokens))  # [N, C]
            runs = np.stack(runs)  # [R, N, C]
            mean = runs.mean(0)
            rival = np.where(np.arange(mean.shape[1])[None] == labels[:, None], np.inf, mean).argmin(1)
            diff = runs[:, np.arange(len(labels)), rival] - runs[:, np.arange(len(labels)), labels]  # > 0: right
            se = float(np.sqrt(diff.var(0, ddof=1).mean()))
            rows.append({"estimator": estimator, "k": k, "se": se, "mean_abs_diff": float(np.abs(diff.mean(0)).mean()),
                         "noise_to_signal": se / float(np.abs(diff.mean(0)).mean())})
            print(f"{estimator:>5} K={k:<3} se {se:8.3f} nats   mean |diff| {rows[-1]['mean_abs_diff']:8.3f}   "
                  f"noise/signal {rows[-1]['noise_to_signal']:.3f}", flush=True)
    if args.json:
        summary = {"checkpoints": args.ckpt, "n_texts": len(val), "replicates": args.replicates, "rows": rows}
        atomic_write(Path(args.json), lambda f: f.write_text(json.dumps(summary, indent=1)))


def curve(args, clf, tokens, labels, ks, sequential) -> None:
    """Accuracy, its 95% interval and mean draws per text for fixed K and sequential scoring (the default estimator)."""
    rows = []
    for k, max_draws in [(k, k) for k in ks] + sequential:
        clf.mc_samples, clf.max_draws, clf.z = k, max_draws, args.z
        start = time.perf_counter()
        draws = clf.draws(tokens)
        seconds = time.perf_counter() - start
        pred = np.nanmean(draws, -1).argmin(1)
        rep = classify.accuracy_report(labels, pred, clf.classes)
        name = f"fixed K={k}" if k == max_draws else f"sequential K={k}..{max_draws} z={args.z:g}"
        rows.append({"setting": name, "k": k, "max_draws": max_draws, "mean_draws": float(scoring.draws_taken(draws).mean()),
                     "accuracy": rep["accuracy"], "accuracy_ci95": rep["accuracy_ci95"],
                     "confusion_matrix": rep["confusion_matrix"], "texts_per_s": len(tokens) / seconds})
        low, high = rep["accuracy_ci95"]
        print(f"{name:<28} mean draws {rows[-1]['mean_draws']:6.2f}   accuracy {rep['accuracy']:.4f} ({low:.4f}-{high:.4f})   "
              f"{rows[-1]['texts_per_s']:.1f} texts/s   confusion {rep['confusion_matrix']}", flush=True)
    if args.json:
        summary = {"checkpoints": args.ckpt, "n_texts": len(tokens), "estimator": clf.estimator, "z": args.z, "rows": rows}
        atomic_write(Path(args.json), lambda f: f.write_text(json.dumps(summary, indent=1)))


def main(argv=None):
    run_cli(run, argv, (CheckpointError, data.DataError))  # one line for bad data, offline, out of memory, Ctrl-C


if __name__ == "__main__":
    main()
