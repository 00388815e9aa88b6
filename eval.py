"""Perplexity bounds of MDLM checkpoints: NELBO in nats/token, bits/token and exp(NELBO/token).

The NELBO upper-bounds -log p_theta(x) (diffusion.py, §3.3), so exp(NELBO / tokens) is an upper
bound on the perplexity. Each text's NELBO is estimated with K draws by scoring.score_texts
(--estimator time, the default: t antithetic, weight 1/t; or count: k ~ U{1..n} masked tokens
weighted n/k); every checkpoint sees the same draws (common random numbers). A joint checkpoint
(train.py --class all) is scored with its label slot masked, i.e. as p(x). Corpus figures are token-weighted: nats/token = sum of NELBOs / sum of tokens; `se` is
the standard error of that ratio over texts (text sampling and Monte-Carlo noise together).

On a labeled dataset (IMDB, or any of data.py's: its test split, or all of --test-data; without
--data, the data the first checkpoint was trained on, cli.checkpoint_data) each
checkpoint is scored on the texts of each class separately: the "confusion of likelihoods" table,
rows = the texts' true class, columns = checkpoints. A class model should have its lowest NELBO
on its own class. With --input, every line of a file (or each .txt file of a folder) is a text. A text longer than a model's
model_length is scored whole, as the sum of the NELBOs of its disjoint windows (score_texts).

    python eval.py --ckpt ckpt/neg --ckpt ckpt/pos --split test --limit 1000 --mc-samples 4 --json ppl.json
    python eval.py --ckpt ckpt/pos --input my_texts.txt --mc-samples 16
    python eval.py --ckpt ckpt/imdb --limit 200 --by-t --json by_t.json   # does the model read its context?

--by-t adds, for each checkpoint, the cross-entropy per masked token at masking rates t = 0.05 ...
0.99 (cross_entropy_by_t), printed beside the unigram and bigram cross-entropies of the same
texts (ngram.py, counts from the training texts: --data's train split less train.py's validation
part). A model at the unigram's value at every t reads no context; `plot.py by_t.json` draws it.
A t that masked no token of the texts (a few short ones) has no cross-entropy: n/a (null in the JSON).
"""
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data
import diffusion
from classify import labeled_texts, read_input
from cli import ArgumentParser, add_scoring_args, checkpoint_data, run_cli
from convert_hf import CheckpointError, atomic_write, load_hf, read_config
from model import PrecisionError, set_runtime
from ngram import CountsLM
from scoring import ESTIMATORS, score_texts


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


BY_T = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99)  # --by-t's grid of masking rates


@torch.inference_mode()
def cross_entropy_by_t(model, token_lists: list[list[int]], ts, seed: int, batch_size: int, device) -> list[dict]:
    """Cross-entropy per masked token at fixed masking rates: how much the model reads its context.

    For each t in `ts`, every real token of every text (window, data.windows) is masked
    independently with probability move_chance(t) (Eq. 2; the draws of text i at t index j come from
    diffusion.draw_seed(seed, i, j), the same for every model) and the model predicts the masked ones
    from the rest: mean over masked tokens of -log p_theta(x0_i | x_t) (SUBS, Eq. 8; a joint model
    with its label slot masked). No 1/t weight: this is the denoiser's loss at t, the integrand of
    Eq. 11 per masked token. A model that ignores its context scores the unigram entropy at every t;
    one that reads it falls below that as t -> 0. token_lists: N non-empty lists of token ids.
    Returns [{"t": t, "masked_tokens": int, "nats_per_masked_token": float, or None where no token
    was masked}] in the order of ts.
    """
    pieces = [(i, piece) for i, ids in enumerate(token_lists) for piece in data.windows(ids, model.config.model_length)]
    out = []
    for j, t in enumerate(ts):
        total, count = 0.0, 0
        for idx in data.length_batches([len(p) for _, p in pieces], batch_size):
            x0, attention_mask = data.collate([pieces[b][1] for b in idx])
            masked = torch.zeros_like(attention_mask)
            for row, b in enumerate(idx):
                g = torch.Generator().manual_seed(diffusion.draw_seed(seed, pieces[b][0], j))
                n = len(pieces[b][1])
                masked[row, :n] = torch.rand(n, generator=g) < diffusion.move_chance(torch.tensor(float(t)))
            if not masked.any():
                continue
            sigma_in = diffusion.model_sigma(model, torch.full((len(idx),), float(t), device=device))
            nll = diffusion.token_nll(model, x0.to(device), masked.to(device), sigma_in,
                                      None if attention_mask.all() else attention_mask.to(device))
            total, count = total + float(nll.sum()), count + int(masked.sum())
        out.append({"t": float(t), "masked_tokens": count, "nats_per_masked_token": total / count if count else None})
    return out


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
    add_scoring_args(p, mc_samples=4, estimators=ESTIMATORS,
                     mc_help="K Monte-Carlo draws of each text's NELBO, the same for every checkpoint")
    p.add_argument("--by-t", action="store_true", help="also the cross-entropy per masked token on a grid of t, "
                   "beside the unigram and bigram models of the same texts")
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
    if not args.test_data and (args.by_t or not args.input):  # --data alone is read: the texts, or --by-t's counts
        checkpoint_data(args, args.ckpt)
    texts, groups, group_names = load_texts(args)  # table rows: the classes (or input)
    tokens = data.encode(texts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    groups = np.array(groups)
    n_tokens = np.array([len(ids) for ids in tokens])
    per_text = np.zeros((len(texts), len(args.ckpt)))               # NELBO in nats, text x checkpoint
    results, by_t, start = [], [], time.perf_counter()
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
        if args.by_t:
            by_t += [{"checkpoint": path, "name": names[m], **row}
                     for row in cross_entropy_by_t(model, tokens, BY_T, args.seed, args.batch_size, device)]
        del model
    seconds = time.perf_counter() - start

    print(f"NELBO bound, nats/token (bits/token, perplexity bound), K={args.mc_samples} draws per text, "
          f"seed {args.seed}: rows = data, columns = checkpoints")
    width = max(30, *(len(n) + 2 for n in names))
    print(" " * 10 + "".join(f"{n:>{width}}" for n in names))
    for g in group_names:
        cells = [f"{r['nats_per_token']:.4f} ({r['bits_per_token']:.3f} b, {r['ppl_bound']:.2f})" for r in results if r["data"] == g]
        n = next(r["n_texts"] for r in results if r["data"] == g)
        print(f"{g:<10}" + "".join(f"{c:>{width}}" for c in cells) + f"   {n} texts")
    reference = print_by_t(args, names, tokens, by_t) if args.by_t else None
    print(f"{seconds:.1f} s on {device}", file=sys.stderr)
    if args.json:
        summary = {"checkpoints": args.ckpt, "names": names, "mc_samples": args.mc_samples, "seed": args.seed,
                   "split": None if args.input or args.test_data else args.split, "limit": args.limit,
                   "data": args.test_data or args.data, "input": args.input,
                   "device": device, "seconds": seconds, "results": results,
                   **({"by_t": by_t, "reference": reference} if args.by_t else {}),
                   "texts": [{"data": str(groups[i]), "n_tokens": int(n_tokens[i]), "nelbo": per_text[i].round(4).tolist()}
                             for i in range(len(texts))]}
        atomic_write(Path(args.json), lambda f: f.write_text(json.dumps(summary, indent=1)))


def print_by_t(args, names: list[str], tokens: list[list[int]], by_t: list[dict]) -> dict:
    """The by-t table (rows t, columns checkpoints) under the counts models of the same texts, fitted
    on the training texts; returns those references, nats per token."""
    reviews, _ = data.load_dataset(args.data, "train", args.text_field, args.label_field)
    counts = CountsLM.fit(data.encode([r.text for r in data.train_val_split(reviews)[0]]))
    reference = {"unigram": counts.unigram_nll(tokens), "bigram": counts.bigram_nll(tokens)}
    print("cross-entropy per masked token (nats) at masking rate t, the rest of the text visible")
    width = max(12, *(len(n) + 2 for n in names))
    print(f"{'t':<10}" + "".join(f"{n:>{width}}" for n in names))
    for t in BY_T:
        cells = ["n/a" if r["nats_per_masked_token"] is None else f"{r['nats_per_masked_token']:.4f}"
                 for r in by_t if r["t"] == t]  # n/a: texts so short that this t masked none of their tokens
        print(f"{t:<10g}" + "".join(f"{c:>{width}}" for c in cells))
    print(f"the same texts: unigram {reference['unigram']:.4f}, bigram {reference['bigram']:.4f} nats/token "
          "(counts from the training texts; a model at the unigram's value reads no context)")
    return reference


if __name__ == "__main__":
    main()
