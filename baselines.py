"""Classical baselines: bag-of-n-grams classifiers to compare the diffusion classifier with, on IMDB or any dataset.

    python baselines.py --data aclImdb_v1.tar.gz                     # all 25,000 test reviews
    python baselines.py --data aclImdb_v1.tar.gz --limit 1000 --json baselines.json   # subset C
    python baselines.py --data aclImdb_v1.tar.gz --tokens bpe        # the same models on GPT-2 tokens
    python baselines.py --data aclImdb_v1.tar.gz --labeled-limit 500 --seed 0   # train.py --labeled-limit 500's labels
    python baselines.py --data aclImdb_v1.tar.gz --limit 1000 --novelty-data ag_news/test.jsonl   # max-probability AUROC
    python baselines.py --data my.jsonl                              # any --data train.py reads: its test split

Trained on the 25,000 train reviews (another dataset: its train split, data.load_dataset), scored on
the test split (or its balanced subset, --limit),
with the settings of shared/data/README.md (fixed beforehand there, never tuned on test):
`<br />` becomes a space, text is lowercased (the vectorizers' default), tokens are words (with
one inner apostrophe: "don't") and `!` `?`, uni+bigrams.

- TF-IDF + LR: TfidfVectorizer(min_df=2, sublinear_tf=True), LogisticRegression(liblinear, C=30).
- NB-LR (Wang & Manning 2012, with LR instead of the SVM): binary counts x scaled by the
  log-count ratio r (alpha = 1), LogisticRegression(liblinear, C=1) on x * r: the recipe of
  nblr.py, the n-gram component train.py fits beside every classifier's MDLM.
- MNB: counts, MultinomialNB(alpha=1) (a generative classifier, like the diffusion one).
More than two classes: each logistic regression one class against the rest (NB-LR: a ratio r per class).

--tokens bpe: the same three models over the diffusion model's own tokens (GPT-2 BPE of the
cleaned text, data.encode: `<br />` -> newline, case kept), each on unigrams and on
uni+bigrams, so a results table compares like with like: MNB on BPE unigrams is the Bayes rule
of a per-class unigram model, the plateau an MDLM classifier starts from.

--labeled-limit N: trained on exactly the N labeled texts train.py --labeled-limit N --seed S
keeps (data.labeled_limit on the same 95 % train part, data.train_val_split); TF-IDF's min_df is 1
below 2,000 labels (at 2, most n-grams of a few hundred texts would be dropped).
--novelty-data FILE: each model's max class probability as a novelty score (lower = more novel),
and the AUROC of telling FILE's texts (classify.read_texts) from the test texts by it
(calibration.auroc), the baseline for classify.py --novelty-data.
"""
import json
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.naive_bayes import MultinomialNB
from sklearn.pipeline import make_pipeline

import calibration
import data
from classify import read_texts
from cli import ArgumentParser
from bench import print_table
from nblr import TOKEN_PATTERN, log_count_ratio



class NBScale(TransformerMixin, BaseEstimator):
    """x -> x * r, with the log-count ratio r = log((p / |p|_1) / (q / |q|_1)), p = alpha + the
    feature sums over positive (label 1) rows, q the same over the others (Wang & Manning 2012)."""

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def fit(self, X, y):
        self.r_ = log_count_ratio(X.tocsr(), np.asarray(y) == 1, self.alpha)
        return self

    def transform(self, X):
        return X @ sp.diags(self.r_)


def baselines(tokens: str = "words", min_df: int = 2) -> dict:
    """name -> unfitted scikit-learn pipeline from a text to its label. tokens "words": raw
    (`<br />`-free) text, uni+bigrams of words; "bpe": texts_and_labels' strings of GPT-2 ids, on
    unigrams and on uni+bigrams (two pipelines per model)."""
    if tokens == "words":
        grams = {"": {"ngram_range": (1, 2), "token_pattern": TOKEN_PATTERN}}
    else:  # one "token" per BPE id, case kept: exactly what the diffusion model reads
        bpe = {"token_pattern": r"\S+", "lowercase": False}
        grams = {" (BPE unigrams)": {"ngram_range": (1, 1), **bpe}, " (BPE uni+bigrams)": {"ngram_range": (1, 2), **bpe}}
    models = {}
    for suffix, ngrams in grams.items():
        models.update({
            "TF-IDF + LR" + suffix: make_pipeline(TfidfVectorizer(min_df=min_df, sublinear_tf=True, **ngrams),
                                                  LogisticRegression(solver="liblinear", C=30)),
            "NB-LR" + suffix: make_pipeline(CountVectorizer(binary=True, **ngrams), NBScale(alpha=1.0),
                                            LogisticRegression(solver="liblinear", C=1)),
            "MNB" + suffix: make_pipeline(CountVectorizer(**ngrams), MultinomialNB(alpha=1.0)),
        })
    return models


def texts_and_labels(reviews: list[data.Review], tokens: str = "words") -> tuple[list[str], np.ndarray]:
    """The vectorizers' input: raw text with `<br />` as a space, or (tokens "bpe") each text's
    GPT-2 ids (data.encode) as a string "id id id ...", and the labels int [N]."""
    if tokens == "bpe":
        texts = [" ".join(map(str, ids)) for ids in data.encode([r.text for r in reviews])]
    else:
        texts = [r.text.replace("<br />", " ") for r in reviews]
    return texts, np.array([r.label for r in reviews])


def training_reviews(path: str | None, labeled_limit: int | None = None, seed: int = 0, text_field: str = "text",
                     label_field: str = "label") -> list[data.Review]:
    """The labeled texts the baselines train on: the train split of any dataset train.py reads
    (data.load_dataset: IMDB's 25,000 train reviews; a dataset without splits, all its labeled texts
    but its held-out test split), or (labeled_limit N) the N that train.py --labeled-limit N --seed S
    keeps (data.labeled_limit on train.py's train part, data.train_val_split). Raises DataError."""
    train = data.load_dataset(path, "train", text_field, label_field)[0]
    return data.labeled_limit(data.train_val_split(train)[0], labeled_limit, seed)[0] if labeled_limit else train


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    data.add_data_args(p)
    p.add_argument("--limit", type=int, help="score a balanced, seeded subset of the test split (1000 = subset C)")
    p.add_argument("--tokens", choices=["words", "bpe"], default="words",
                   help="words: the settings above; bpe: GPT-2 tokens (the diffusion model's), unigrams and uni+bigrams")
    p.add_argument("--labeled-limit", type=data.positive(), metavar="N",
                   help="train on the N labeled texts train.py --labeled-limit N --seed S trains on (N / C per class)")
    p.add_argument("--seed", type=int, default=0, help="--labeled-limit: which N texts (train.py's --seed)")
    p.add_argument("--novelty-data", metavar="FILE", help="texts of another kind: the AUROC of telling them from the "
                   "test texts by one minus each model's max class probability")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    try:
        train = training_reviews(args.data, args.labeled_limit, args.seed, args.text_field, args.label_field)
        test, names = data.load_dataset(args.data, "test", args.text_field, args.label_field)
        if args.limit:
            test = data.balanced_subset(test, args.limit)
        x_train, y_train = texts_and_labels(train, args.tokens)
        x_test, y_test = texts_and_labels(test, args.tokens)
        other = None
        if args.novelty_data:
            texts = read_texts(args.novelty_data)[0]
            other = texts_and_labels([data.Review(t, data.UNLABELED, i, 0) for i, t in enumerate(texts)], args.tokens)[0]
    except data.DataError as e:
        raise SystemExit(f"error: {e}")

    results, rows = {}, []
    for name, pipe in baselines(args.tokens, min_df=1 if len(x_train) < 2000 else 2).items():
        if len(names) > 2 and isinstance(pipe[-1], LogisticRegression):  # liblinear fits two classes: one LR
            pipe = make_pipeline(pipe[0], OneVsRestClassifier(pipe[1:]))  # per class vs the rest (NB-LR: its own r)
        start = time.perf_counter()
        pipe.fit(x_train, y_train)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        pred = pipe.predict(x_test)
        predict_s = time.perf_counter() - start
        accuracy = float(np.mean(pred == y_test))
        features = len(pipe[0].vocabulary_)
        cm = np.zeros((len(names), len(names)), dtype=int)
        np.add.at(cm, (y_test, pred), 1)  # rows true, columns predicted
        results[name] = {"accuracy": accuracy, "accuracy_ci95": list(calibration.wilson_interval(accuracy, len(y_test))),
                         "confusion_matrix": cm.tolist(), "features": features, "fit_seconds": fit_s, "test_reviews_per_s": len(x_test) / predict_s}
        rows.append({"model": name, "features": f"{features:,}", "test accuracy": f"{100 * accuracy:.2f}%",
                     "fit s": f"{fit_s:.0f}", "test reviews/s": f"{len(x_test) / predict_s:.0f}"})
        if other is not None:  # novelty: one minus the max class probability
            auc = calibration.auroc(-pipe.predict_proba(x_test).max(1), -pipe.predict_proba(other).max(1))
            results[name]["novelty_auroc_max_prob"] = auc
            rows[-1]["novelty AUROC"] = f"{auc:.4f}"
    print_table(f"trained on {len(x_train):,} train reviews" + (f" (--labeled-limit {args.labeled_limit}, --seed {args.seed})"
                if args.labeled_limit else "") + f", scored on {len(x_test):,} test reviews"
                + (f" (balanced subset, --limit {args.limit})" if args.limit else "")
                + (f"; novelty AUROC vs {len(other):,} texts of {args.novelty_data}" if other is not None else ""), rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"n_train": len(x_train), "n_test": len(x_test), "limit": args.limit, "tokens": args.tokens,
                                               "labeled_limit": args.labeled_limit, "seed": args.seed, "novelty_data": args.novelty_data,
                                               "classes": names, "models": results}, indent=1))


if __name__ == "__main__":
    main()
