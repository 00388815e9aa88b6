"""Generative classification with one MDLM per class (Bayes rule over the NELBO bounds).

Each class model c gives an upper bound NELBO_c(x) >= -log p(x | c) (diffusion.py). A text gets
label argmax_c [log prior_c - NELBO_c(x)] and posteriors softmax_c [log prior_c - NELBO_c(x)]
(uniform prior). NELBO_c(x) is estimated with K Monte-Carlo draws of (t, masked positions),
antithetic in t, and the *same* draws for every class model (common random numbers), so the
noise of the estimate largely cancels in the comparison.

    python classify.py --ckpt0 ckpt/neg --ckpt1 ckpt/pos --limit 1000 --mc-samples 4 --json out.json
    echo "What a wonderful film" | python classify.py --ckpt0 ckpt/neg --ckpt1 ckpt/pos --input -
"""
import argparse
import json
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import diffusion
from convert_hf import CheckpointError, load_hf, read_config
from pathlib import Path


@torch.inference_mode()
def score_texts(models: list, token_lists: list[list[int]], k: int, seed: int, batch_size: int,
                device, progress: bool = False) -> np.ndarray:
    """NELBO of every text under every model, in nats, averaged over k draws: float64 [N, C].

    token_lists: N non-empty lists of token ids (<= model_length each). Text i uses the draws of
    seed `seed * 1_000_003 + i` for every model (common random numbers), whatever batch it lands in.
    batch_size counts sequences per forward pass (text x draw), so memory does not grow with k.
    """
    seeds = [seed * 1_000_003 + i for i in range(len(token_lists))]
    lengths = [len(ids) for ids in token_lists]
    out = np.zeros((len(token_lists), len(models)))
    batches = data.length_batches(lengths, max(1, batch_size // k))
    for idx in tqdm(batches, desc="scoring", disable=not progress, unit="batch"):
        t, masked = diffusion.per_text_draws([lengths[i] for i in idx], k, [seeds[i] for i in idx])
        x0, attention_mask = data.collate([token_lists[i] for i in idx], device)
        x0, attention_mask = x0.repeat_interleave(k, 0), attention_mask.repeat_interleave(k, 0)
        t, masked = t.to(device), masked.to(device)
        for c, model in enumerate(models):
            out[idx, c] = diffusion.nelbo(model, x0, t, masked, attention_mask).view(len(idx), k).mean(1).double().cpu().numpy()
    return out


def posteriors(nelbo: np.ndarray) -> np.ndarray:
    """Bayes rule with a uniform prior: softmax over classes of -NELBO. [N, C] nats -> [N, C], rows sum to 1."""
    z = -nelbo - (-nelbo).max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def load_class_models(paths: list[str], device) -> tuple[list, list[str]]:
    """Load one checkpoint per class (index = position). Raises ValueError if their configs differ
    or a checkpoint was trained for another class index (CheckpointError). Returns (models, class names)."""
    configs = [read_config(Path(p)) for p in paths]
    for p, (cfg, raw) in zip(paths[1:], configs[1:]):
        if cfg != configs[0][0]:
            raise CheckpointError(f"{p}: config {cfg} differs from {paths[0]}: {configs[0][0]} (class models must match)")
    names = []
    for c, (p, (_, raw)) in enumerate(zip(paths, configs)):
        if raw.get("class_index", c) != c:
            raise CheckpointError(f"{p}: trained for class {raw['class_index']}, but passed as class {c}")
        names.append(raw.get("class_name", str(c)))
    data.check_vocab(configs[0][0].vocab_size, paths[0])
    return [load_hf(p).to(device) for p in paths], names


def report(labels: np.ndarray, pred: np.ndarray, names: list[str]) -> dict:
    """Accuracy, confusion matrix (rows = true class, columns = predicted) and per-class precision/recall."""
    C = len(names)
    cm = np.zeros((C, C), dtype=int)
    np.add.at(cm, (labels, pred), 1)
    per_class = {names[c]: {"precision": cm[c, c] / max(cm[:, c].sum(), 1), "recall": cm[c, c] / max(cm[c].sum(), 1),
                            "support": int(cm[c].sum()), "predicted": int(cm[:, c].sum())} for c in range(C)}
    return {"accuracy": float(np.mean(labels == pred)), "confusion_matrix": cm.tolist(), "per_class": per_class}


def read_input(path: str) -> list[str]:
    """One text per line from a file or '-' (stdin); blank lines are skipped."""
    if path != "-" and not Path(path).is_file():
        raise data.DataError(f"--input {path}: no such file")
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    with stream:
        texts = [line.rstrip("\n") for line in stream if line.strip()]
    if not texts:
        raise data.DataError(f"--input {path}: no text (expected one text per line)")
    return texts


def main():
    try:
        run()
    except (CheckpointError, data.DataError) as e:
        sys.exit(f"error: {e}")


def run():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt0", help="checkpoint folder of class 0 (negative)")
    p.add_argument("--ckpt1", help="checkpoint folder of class 1 (positive)")
    p.add_argument("--ckpt", action="append", default=[], help="class checkpoints in class order (repeat for N classes)")
    p.add_argument("--data", help="aclImdb tarball or folder (default: $IMDB_PATH, else download)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--limit", type=int, help="score a balanced, seeded subset of this many reviews (1000 = subset C)")
    p.add_argument("--input", help="score your own texts instead: a file with one text per line, or - for stdin")
    p.add_argument("--mc-samples", type=int, default=4, help="K draws of (t, mask) per text")
    p.add_argument("--batch-size", type=int, default=32, help="sequences (text x draw) per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo draws")
    p.add_argument("--json", help="write the summary and per-text posteriors here")
    args = p.parse_args()
    paths = [x for x in (args.ckpt0, args.ckpt1) if x] + args.ckpt
    if len(paths) < 2:
        p.error("give at least two class checkpoints (--ckpt0 A --ckpt1 B, or --ckpt A --ckpt B ...)")
    if args.mc_samples < 1 or args.batch_size < 1:
        p.error("--mc-samples and --batch-size must be >= 1")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    models, names = load_class_models(paths, device)
    max_len = models[0].config.model_length
    if args.input:
        texts, labels = read_input(args.input), None
    else:
        reviews = data.load_imdb(args.split, args.data)
        if args.limit:
            reviews = data.balanced_subset(reviews, args.limit)
        texts, labels = [r.text for r in reviews], np.array([r.label for r in reviews])
    tokens = data.encode(texts, max_len)
    empty = [i for i, ids in enumerate(tokens) if not ids]
    if empty:
        sys.exit(f"error: text {empty[0] + 1} has no tokens after cleaning; nothing to score")

    start = time.perf_counter()
    nelbo = score_texts(models, tokens, args.mc_samples, args.seed, args.batch_size, device, progress=True)
    seconds = time.perf_counter() - start
    post = posteriors(nelbo)
    pred = post.argmax(1)
    n_tokens = sum(len(ids) for ids in tokens)

    summary = {"n_texts": len(texts), "classes": names, "checkpoints": paths, "mc_samples": args.mc_samples,
               "seed": args.seed, "device": device, "seconds": seconds, "texts_per_s": len(texts) / seconds,
               "truncated_texts": sum(len(ids) == max_len for ids in tokens), "max_len": max_len}
    if labels is None:
        for c, pr, text in zip(pred, post, texts):
            print(f"{names[c]}\t{pr[c]:.4f}\t{text[:70]}")
    else:
        summary["split"], summary["limit"] = args.split, args.limit
        summary.update(report(labels, pred, names))
        # mean NELBO (nats/token) of each class model on each true class: the evidence behind the confusion matrix
        summary["nats_per_token"] = {names[c]: {names[m]: float(nelbo[labels == c, m].sum() / sum(len(tokens[i]) for i in np.flatnonzero(labels == c)))
                                                for m in range(len(names))} for c in range(len(names))}
        print(f"accuracy {summary['accuracy']:.4f} on {len(texts)} {args.split} reviews, K={args.mc_samples}, "
              f"{summary['texts_per_s']:.1f} reviews/s on {device}")
        print("confusion matrix (rows true, columns predicted): " + ", ".join(names))
        for c, row in enumerate(summary["confusion_matrix"]):
            print(f"  {names[c]:>8} " + " ".join(f"{v:6d}" for v in row))
        for c, d in summary["per_class"].items():
            print(f"  {c}: precision {d['precision']:.4f} recall {d['recall']:.4f}")
        for c, row in summary["nats_per_token"].items():
            print(f"  true {c}: nats/token under " + ", ".join(f"{m} {v:.4f}" for m, v in row.items()))
    if args.json:
        summary["texts"] = [{"label": None if labels is None else int(labels[i]), "pred": int(pred[i]),
                             "posterior": post[i].round(6).tolist(), "nelbo": nelbo[i].round(4).tolist(),
                             "n_tokens": len(tokens[i])} for i in range(len(texts))]
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
