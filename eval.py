"""Perplexity bounds of MDLM checkpoints: NELBO in nats/token, bits/token and exp(NELBO/token).

The NELBO upper-bounds -log p_theta(x) (diffusion.py, §3.3), so exp(NELBO / tokens) is an upper
bound on the perplexity. Each text's NELBO is estimated with K draws by classify.score_texts
(--estimator time, the default: t antithetic, weight 1/t; or count: k ~ U{1..n} masked tokens
weighted n/k); every checkpoint sees the same draws (common random numbers). A joint checkpoint
(train.py --class all) is scored with its label slot masked, i.e. as p(x). Corpus figures are token-weighted: nats/token = sum of NELBOs / sum of tokens; `se` is
the standard error of that ratio over texts (text sampling and Monte-Carlo noise together).

On a labeled dataset (IMDB, or any of data.py's: its test split, or all of --test-data) each
checkpoint is scored on the texts of each class separately: the "confusion of likelihoods" table,
rows = the texts' true class, columns = checkpoints. A class model should have its lowest NELBO
on its own class. With --input, every line of a file (or each .txt file of a folder) is a text. A text longer than a model's
model_length is scored whole, as the sum of the NELBOs of its disjoint windows (score_texts).

    python eval.py --ckpt ckpt/neg --ckpt ckpt/pos --split test --limit 1000 --mc-samples 4 --json ppl.json
    python eval.py --ckpt ckpt/pos --input my_texts.txt --mc-samples 16
"""
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data
from classify import ESTIMATORS, labeled_texts, read_input, score_texts
from cli import ArgumentParser, add_scoring_args, run_cli
from convert_hf import CheckpointError, atomic_write, load_hf, read_config
from model import PrecisionError, set_runtime


def summarise(nelbo: np.ndarray, n_tokens: np.ndarray) -> dict:
    """Corpus bound from per-text NELBOs (nats, [N]) and token counts ([N]).

    nats_per_token = sum(nelbo) / sum(n_tokens); se: its standard error over texts (delta method
    for a ratio, sqrt(sum (nelbo_i - r n_i)^2 * N/(N-1)) / sum(n_tokens); 0 for one text);
    bits_per_token = nats / ln 2; ppl_bound = exp(nats_per_token).
    """
    total, n = float(nelbo.sum()), float(n_tokens.sum())
    r = total / n
    N = len(nelbo)
    se = math.sqrt(float(((nelbo - r * n_tokens) ** 2).sum()) * N / (N - 1)) / n if N > 1 else 0.0
    return {"n_texts": N, "n_tokens": int(n), "nelbo_nats": total, "nats_per_token": r, "se": se,
            "bits_per_token": r / math.log(2), "ppl_bound": math.exp(r)}


def checkpoint_name(path: str) -> str:
    """The class name stored by train.py in config.json, else the folder's name."""
    _, raw = read_config(Path(path))
    return raw.get("class_name") or Path(path).name


def load_texts(args) -> tuple[list[str], list[str], list[str]]:
    """(texts, group of each text, the groups in table order): labeled texts grouped by class name
    (classify.labeled_texts), or the texts of --input (group 'input')."""
    if args.input:
        texts, _ = read_input(args.input)
        return texts, ["input"] * len(texts), ["input"]
    reviews, names = labeled_texts(args)
    groups = [names[r.label] for r in reviews]
    return [r.text for r in reviews], groups, [n for n in names if n in set(groups)]


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", action="append", required=True, help="checkpoint folder (repeat to compare several)")
    add_scoring_args(p, mc_samples=4, estimators=ESTIMATORS)
    p.add_argument("--json", help="write the table and per-text NELBOs here")
    args = p.parse_args(argv)
    if args.input and (args.limit or args.data or args.test_data):
        p.error("--limit, --data and --test-data select labeled texts; they do not apply to --input")
    try:
        run_cli(run, args, (CheckpointError, data.DataError))
    except PrecisionError as e:  # the flag's own error, with the usage line
        p.error(f"argument --precision: {e}")


def run(args):
    names = [checkpoint_name(path) for path in args.ckpt]
    texts, groups, group_names = load_texts(args)  # table rows: the classes (or input)
    tokens = data.encode(texts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    groups = np.array(groups)
    n_tokens = np.array([len(ids) for ids in tokens])
    per_text = np.zeros((len(texts), len(args.ckpt)))               # NELBO in nats, text x checkpoint
    results, start = [], time.perf_counter()
    for m, path in enumerate(args.ckpt):
        model = set_runtime(load_hf(path).to(device), args.precision, inference=True)
        cfg = model.config
        data.check_vocab(cfg.vocab_size, path)
        if args.estimator == "count" and cfg.time_conditioning:
            raise CheckpointError(f"{path}: a time-conditioned model; the count estimator needs one without "
                                  "time conditioning (pass --estimator time)")
        per_text[:, m] = score_texts([model], tokens, args.mc_samples, args.seed, args.batch_size, device,
                                     estimator=args.estimator, progress=True)[:, 0]
        for g in group_names:
            rows = groups == g
            results.append({"data": g, "checkpoint": path, "name": names[m], "max_len": cfg.model_length,
                            "windowed_texts": int((n_tokens[rows] > cfg.model_length).sum()),
                            **summarise(per_text[rows, m], n_tokens[rows])})
        del model
    seconds = time.perf_counter() - start

    print(f"NELBO bound, nats/token (perplexity bound), K={args.mc_samples} draws per text, "
          f"seed {args.seed}: rows = data, columns = checkpoints")
    width = max(22, *(len(n) + 2 for n in names))
    print(" " * 10 + "".join(f"{n:>{width}}" for n in names))
    for g in group_names:
        cells = [f"{r['nats_per_token']:.4f} ({r['ppl_bound']:.2f})" for r in results if r["data"] == g]
        n = next(r["n_texts"] for r in results if r["data"] == g)
        print(f"{g:<10}" + "".join(f"{c:>{width}}" for c in cells) + f"   {n} texts")
    print(f"{seconds:.1f} s on {device}", file=sys.stderr)
    if args.json:
        summary = {"checkpoints": args.ckpt, "names": names, "mc_samples": args.mc_samples, "seed": args.seed,
                   "split": None if args.input or args.test_data else args.split, "limit": args.limit,
                   "data": args.test_data or args.data, "input": args.input,
                   "device": device, "seconds": seconds, "results": results,
                   "texts": [{"data": str(groups[i]), "n_tokens": int(n_tokens[i]), "nelbo": per_text[i].round(4).tolist()}
                             for i in range(len(texts))]}
        atomic_write(Path(args.json), lambda f: f.write_text(json.dumps(summary, indent=1)))


if __name__ == "__main__":
    main()
