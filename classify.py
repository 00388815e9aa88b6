"""Generative classification with one MDLM per class (Bayes rule over the NELBO bounds).

Each class model c gives an upper bound NELBO_c(x) >= -log p(x | c) (diffusion.py). A text gets
label argmax_c [log prior_c - NELBO_c(x)] and posteriors softmax_c [log prior_c - NELBO_c(x)]
(uniform prior). NELBO_c(x) is estimated with K Monte-Carlo draws of (t, masked positions),
antithetic in t, and the *same* draws for every class model (common random numbers), so the
noise of the estimate largely cancels in the comparison. A text longer than the models'
model_length is scored whole: the NELBOs of its disjoint windows (data.windows) are summed.

From Python (a notebook):

    from classify import DiffusionClassifier
    clf = DiffusionClassifier.from_checkpoints(["ckpt/neg", "ckpt/pos"], mc_samples=8)
    clf.predict(["What a wonderful film"])   # ['pos']

From the shell:

    python classify.py --ckpt0 ckpt/neg --ckpt1 ckpt/pos --limit 1000 --mc-samples 4 --json out.json
    python classify.py --ckpt ckpt/a --ckpt ckpt/b --ckpt ckpt/c --data my.jsonl     # its held-out test split
    echo "What a wonderful film" | python classify.py --ckpt0 ckpt/neg --ckpt1 ckpt/pos --input -
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import diffusion
from convert_hf import CheckpointError, load_hf, read_config


@torch.inference_mode()
def score_texts(models: list, token_lists: list[list[int]], k: int, seed: int, batch_size: int,
                device, progress: bool = False) -> np.ndarray:
    """NELBO of every text under every model, in nats, averaged over k draws: float64 [N, C].

    token_lists: N non-empty lists of token ids, of any length. A text longer than the models'
    model_length is split into disjoint windows (data.windows) and its NELBO is the sum of theirs;
    a text that fits is one window. Window w of text i uses the draws of seed
    `seed * 1_000_003 + i + w * 2**40` for every model (common random numbers), whatever batch it
    lands in. batch_size counts sequences per forward pass (window x draw), so memory does not grow with k.
    Under torchrun (torch.distributed initialised) each rank scores every world-th batch and the
    results are summed across ranks, so every rank returns the same array as one process would.
    """
    max_len = models[0].config.model_length
    pieces, owners, seeds = [], [], []
    for i, ids in enumerate(token_lists):
        for w, piece in enumerate(data.windows(ids, max_len)):
            pieces.append(piece)
            owners.append(i)
            seeds.append(seed * 1_000_003 + i + w * 2**40)
    lengths = [len(ids) for ids in pieces]
    per_piece = np.zeros((len(pieces), len(models)))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batches = data.length_batches(lengths, max(1, batch_size // k))[rank::world]  # under torchrun: every world-th batch
    for idx in tqdm(batches, desc="scoring", disable=not progress or rank > 0, unit="batch"):
        t, masked = diffusion.per_text_draws([lengths[i] for i in idx], k, [seeds[i] for i in idx])
        x0, attention_mask = data.collate([pieces[i] for i in idx], device)
        x0, attention_mask = x0.repeat_interleave(k, 0), attention_mask.repeat_interleave(k, 0)
        t, masked = t.to(device), masked.to(device)
        for c, model in enumerate(models):
            per_piece[idx, c] = diffusion.nelbo(model, x0, t, masked, attention_mask).view(len(idx), k).mean(1).double().cpu().numpy()
    if world > 1:  # every rank filled only its own rows: the sum gathers them all, on every rank
        gathered = torch.from_numpy(per_piece).to(device)
        dist.all_reduce(gathered)
        per_piece = gathered.cpu().numpy()
    out = np.zeros((len(token_lists), len(models)))
    np.add.at(out, owners, per_piece)
    return out


def init_distributed() -> tuple[int, int, str]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE set) join the process group: NCCL with
    one GPU per process (LOCAL_RANK), gloo on CPU. A plain `python script.py` is rank 0 of 1."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, "cuda" if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = "cpu"
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def fail(message: str):
    """Exit with a one-line error. Under torchrun every rank meets the same error; rank 0 says it."""
    raise SystemExit(message if int(os.environ.get("RANK", 0)) == 0 else 1)


def posteriors(nelbo: np.ndarray) -> np.ndarray:
    """Bayes rule with a uniform prior: softmax over classes of -NELBO. [N, C] nats -> [N, C], rows sum to 1."""
    z = -nelbo - (-nelbo).max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def load_class_models(paths: list[str], device) -> tuple[list, list[str]]:
    """Load one checkpoint per class (index = position). Returns (models, class names).

    Raises CheckpointError if the model configs differ, a checkpoint is a base model (--class
    all), was trained for another class index or on other classes, or there is not one checkpoint
    per class of its training data; DataError if the vocabulary is not GPT-2's.
    """
    configs = [read_config(Path(p)) for p in paths]
    cfg0, raw0 = configs[0]
    for p, (cfg, raw) in zip(paths[1:], configs[1:]):
        if cfg != cfg0:
            raise CheckpointError(f"{p}: config {cfg} differs from {paths[0]}: {cfg0} (class models must match)")
        if raw.get("classes") != raw0.get("classes"):
            raise CheckpointError(f"{p}: trained on classes {raw.get('classes')}, {paths[0]} on {raw0.get('classes')}")
    if "classes" in raw0 and len(raw0["classes"]) != len(paths):
        raise CheckpointError(f"{paths[0]}: its data has {len(raw0['classes'])} classes ({', '.join(raw0['classes'])}), "
                              f"but {len(paths)} checkpoints were given (one per class, in class order)")
    names = []
    for c, (p, (_, raw)) in enumerate(zip(paths, configs)):
        if raw.get("class_name") == "all":
            raise CheckpointError(f"{p}: a base model trained on every class (--class all), not a class model")
        if raw.get("class_index", c) != c:
            raise CheckpointError(f"{p}: trained for class {raw['class_index']}, but passed as class {c}")
        names.append(raw.get("class_name", str(c)))
    data.check_vocab(cfg0.vocab_size, paths[0])
    return [load_hf(p).to(device) for p in paths], names


class DiffusionClassifier:
    """A generative classifier from one MDLM per class, for use from Python.

        clf = DiffusionClassifier.from_checkpoints(["ckpt/neg", "ckpt/pos"], device="cuda", mc_samples=8)
        clf.classes                 # ['neg', 'pos']
        clf.predict(texts)          # list of N class names
        clf.predict_proba(texts)    # float64 [N, C], rows sum to 1
        clf.nelbo(texts)            # float64 [N, C], nats

    texts: a list of N strings, each with at least one token (cleaned and encoded as in training;
    any length: long texts are scored window by window, see score_texts). Results are
    deterministic given `seed`: text i of a call always gets the same Monte-Carlo draws, shared
    by every class model; batches are grouped by length internally. Uniform class prior.
    """

    def __init__(self, models: list, classes: list[str], mc_samples: int = 4, seed: int = 0, batch_size: int = 32):
        """models: one DiT per class, in class order, eval mode, on one device; classes: their names.
        mc_samples: K draws of (t, mask) per text; batch_size: sequences (window x draw) per forward pass."""
        if mc_samples < 1 or batch_size < 1:
            raise ValueError(f"mc_samples {mc_samples} and batch_size {batch_size} must be >= 1")
        self.models, self.classes = models, list(classes)
        self.mc_samples, self.seed, self.batch_size = mc_samples, seed, batch_size
        self.device = next(models[0].parameters()).device

    @classmethod
    def from_checkpoints(cls, paths: list[str], device=None, mc_samples: int = 4, seed: int = 0,
                         batch_size: int = 32) -> "DiffusionClassifier":
        """Load the class models (train.py checkpoint folders, in class order) onto `device` (default:
        CUDA if available, else CPU). Raises CheckpointError / DataError as load_class_models."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        models, classes = load_class_models(paths, device)
        return cls(models, classes, mc_samples, seed, batch_size)

    def nelbo(self, texts: list[str]) -> np.ndarray:
        """NELBO_c(text) in nats (upper bound on -log p(text | c)): float64 [N, C].
        Raises DataError for a text with no tokens."""
        return self.score(data.encode(texts))

    def score(self, token_lists: list[list[int]], progress: bool = False) -> np.ndarray:
        """nelbo for texts already encoded (data.encode): N non-empty lists of GPT-2 ids -> float64 [N, C] nats."""
        return score_texts(self.models, token_lists, self.mc_samples, self.seed, self.batch_size, self.device, progress)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """Posterior p(c | text) under a uniform prior: float64 [N, C], rows sum to 1."""
        return posteriors(self.nelbo(texts))

    def predict(self, texts: list[str]) -> list[str]:
        """The most probable class name of each text (argmax of predict_proba)."""
        return [self.classes[c] for c in self.predict_proba(texts).argmax(1)]


def report(labels: np.ndarray, pred: np.ndarray, names: list[str]) -> dict:
    """Accuracy, confusion matrix (rows = true class, columns = predicted) and per-class precision/recall."""
    C = len(names)
    cm = np.zeros((C, C), dtype=int)
    np.add.at(cm, (labels, pred), 1)
    per_class = {names[c]: {"precision": cm[c, c] / max(cm[:, c].sum(), 1), "recall": cm[c, c] / max(cm[c].sum(), 1),
                            "support": int(cm[c].sum()), "predicted": int(cm[:, c].sum())} for c in range(C)}
    return {"accuracy": float(np.mean(labels == pred)), "confusion_matrix": cm.tolist(), "per_class": per_class}


def read_input(path: str) -> tuple[list[str], list[int]]:
    """One text per line from a file or '-' (stdin): (texts, their line numbers, from 1).

    Blank lines are skipped; the line numbers keep results aligned with the file. A line longer
    than model_length tokens is scored whole, in windows (score_texts). Raises DataError for a
    missing file, a line that is not UTF-8 (named), or no text at all.
    """
    if path != "-" and not Path(path).is_file():
        raise data.DataError(f"--input {path}: no such file")
    raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    lines = [(n, text) for n, text in data.utf8_lines(raw, f"--input {path}") if text.strip()]
    if not lines:
        raise data.DataError(f"--input {path}: no text (expected one text per line)")
    return [text for _, text in lines], [n for n, _ in lines]


def labeled_texts(args) -> tuple[list[data.Review], list[str]]:
    """The labeled texts a CLI evaluates, and the class names their labels index: every text of
    --test-data if given, else the --split of --data (a dataset without splits: its held-out test
    split), cut to a balanced, seeded --limit. Raises DataError."""
    if args.test_data:
        reviews, names = data.read_labeled(args.test_data, args.text_field, args.label_field)
    else:
        reviews, names = data.load_dataset(args.data, args.split, args.text_field, args.label_field)
    return (data.balanced_subset(reviews, args.limit) if args.limit else reviews), names


def main(argv=None):
    try:
        run(argv)
    except (CheckpointError, data.DataError) as e:
        fail(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def add_scoring_args(p: argparse.ArgumentParser) -> None:
    """The flags classify.py and eval.py share: which texts to score, and how the NELBO is estimated."""
    data.add_data_args(p)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--test-data", help="a separate labeled test set (.jsonl, .csv or class folder): score all of it")
    p.add_argument("--limit", type=data.positive(), help="score a balanced, seeded subset of this many texts (IMDB: 1000 = subset C)")
    p.add_argument("--input", help="score your own texts instead: a file with one text per line, or - for stdin")
    p.add_argument("--mc-samples", type=data.positive(), default=4, help="K draws of (t, mask) per text")
    p.add_argument("--batch-size", type=data.positive(), default=32, help="sequences (window x draw) per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo draws")


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt0", help="checkpoint folder of class 0 (negative)")
    p.add_argument("--ckpt1", help="checkpoint folder of class 1 (positive)")
    p.add_argument("--ckpt", action="append", default=[], help="class checkpoints in class order (repeat for N classes)")
    add_scoring_args(p)
    p.add_argument("--json", help="write the summary and per-text posteriors here")
    args = p.parse_args(argv)
    paths = [x for x in (args.ckpt0, args.ckpt1) if x] + args.ckpt
    if len(paths) < 2:
        p.error("give at least two class checkpoints (--ckpt0 A --ckpt1 B, or --ckpt A --ckpt B ...)")

    rank, world, device = init_distributed()
    clf = DiffusionClassifier.from_checkpoints(paths, device, args.mc_samples, args.seed, args.batch_size)
    names, max_len = clf.classes, clf.models[0].config.model_length
    if args.input:
        (texts, lines), labels = read_input(args.input), None
    else:
        reviews, data_names = labeled_texts(args)
        unknown = [n for n in data_names if n not in names]
        if unknown:
            raise data.DataError(f"{args.test_data or args.data}: class {unknown[0]!r} has no checkpoint "
                                 f"(the checkpoints are {', '.join(names)})")
        texts, labels = [r.text for r in reviews], np.array([names.index(data_names[r.label]) for r in reviews])
    tokens = data.encode(texts)

    start = time.perf_counter()
    nelbo = clf.score(tokens, progress=True)
    seconds = time.perf_counter() - start
    if rank > 0:  # every rank holds every result (score_texts gathers them); rank 0 reports
        return
    post = posteriors(nelbo)
    pred = post.argmax(1)

    summary = {"n_texts": len(texts), "classes": names, "checkpoints": paths, "mc_samples": args.mc_samples,
               "seed": args.seed, "device": str(clf.device), "processes": world, "seconds": seconds,
               "texts_per_s": len(texts) / seconds, "windowed_texts": sum(len(ids) > max_len for ids in tokens), "max_len": max_len}
    if labels is None:
        summary.update(input=args.input, lines=lines)
        print(f"{len(texts)} texts from --input {args.input} (blank lines skipped); {summary['windowed_texts']} "
              f"longer than {max_len} tokens scored whole in windows", file=sys.stderr)
        print("line\tclass\tposterior\ttext")
        for n, c, pr, text in zip(lines, pred, post, texts):
            print(f"{n}\t{names[c]}\t{pr[c]:.4f}\t{text[:70]}")
    else:
        source = args.test_data or f"{args.split} split"
        summary.update(data=args.test_data or args.data, split=None if args.test_data else args.split, limit=args.limit)
        summary.update(report(labels, pred, names))
        # mean NELBO (nats/token) of each class model on each true class: the evidence behind the confusion matrix
        summary["nats_per_token"] = {names[c]: {names[m]: float(nelbo[labels == c, m].sum() / sum(len(tokens[i]) for i in np.flatnonzero(labels == c)))
                                                for m in range(len(names))} for c in np.unique(labels)}
        print(f"accuracy {summary['accuracy']:.4f} on {len(texts)} texts ({source}), K={args.mc_samples}, "
              f"{summary['texts_per_s']:.1f} texts/s on {clf.device}; {summary['windowed_texts']} texts longer than "
              f"{max_len} tokens scored in windows")
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
                             "n_tokens": len(tokens[i]), **({"line": lines[i]} if labels is None else {})}
                            for i in range(len(texts))]
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
