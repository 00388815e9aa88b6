"""IMDB Large Movie Review Dataset (Maas et al. 2011), GPT-2 BPE, and length-bucketed batches.

Reads Stanford's `aclImdb_v1.tar.gz` (the tarball or its extracted folder). Where the data is:
`--data PATH`, else the `IMDB_PATH` environment variable, else a download from Stanford into
~/.cache/mdlm-classifier. Class index 0 = negative (`neg`), 1 = positive (`pos`).

Tokens: tiktoken's `gpt2` encoding without BOS/EOS (mdlm-owt-noeos was trained without them);
the mask token is id 50257 = the model's vocab_size - 1. `<br />` tags become newlines everywhere
(training, validation and classification see the same text). Reviews longer than the model's
context (`model_length`: 1024 tokens for `small`, which keeps 98% of reviews whole; 512 for `tiny`,
87%) are truncated to their first `model_length` tokens.
"""
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
CLASSES = ("neg", "pos")
SPLITS = ("train", "test", "unsup")
# aclImdb/<split>/<label>/<id>_<rating>.txt ; unsup lives in train/unsup
REVIEW_PATH = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg|unsup)/(\d+)_(\d+)\.txt$")


class DataError(ValueError):
    """Data that cannot be used as asked; the message names the path or argument."""


@dataclass
class Review:
    text: str
    label: int   # index into CLASSES; -1 for unlabeled (unsup) reviews
    id: int      # the <id> of <id>_<rating>.txt
    rating: int  # 1-4 neg, 7-10 pos, 0 unsup


def imdb_path(path: str | None = None) -> Path:
    """The local tarball or folder: `path`, else $IMDB_PATH, else Stanford's tarball downloaded once to a cache."""
    path = path or os.environ.get("IMDB_PATH")
    if path:
        if not os.path.exists(path):
            raise DataError(f"--data {path}: no such file or folder (expected aclImdb_v1.tar.gz or its extracted folder)")
        return Path(path)
    target = Path.home() / ".cache" / "mdlm-classifier" / "aclImdb_v1.tar.gz"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(IMDB_URL, str(target))  # writes a temp file, then renames
    return target


def _split_of(split_dir: str, label_dir: str) -> str:
    return "unsup" if label_dir == "unsup" else split_dir


def _review(split_dir, label_dir, rid, rating, text) -> Review:
    return Review(text, -1 if label_dir == "unsup" else CLASSES.index(label_dir), int(rid), int(rating))


def load_imdb(split: str, path: str | None = None) -> list[Review]:
    """All reviews of one split ('train', 'test' or 'unsup'), ordered by (label, id).

    Raises DataError for an unknown split, a path that is neither an aclImdb tarball nor folder,
    or a split with no reviews.
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    root = imdb_path(path)
    reviews = []
    if root.is_file():
        if not tarfile.is_tarfile(root):
            raise DataError(f"--data {root}: not a tar archive (expected aclImdb_v1.tar.gz)")
        with tarfile.open(root) as tar:
            for member in tar:  # one pass over the gzip stream (~6 s for the whole archive)
                m = REVIEW_PATH.search(member.name)
                if member.isfile() and m and _split_of(m[1], m[2]) == split:
                    reviews.append(_review(*m.groups(), tar.extractfile(member).read().decode("utf-8")))
    else:
        base = root / "aclImdb" if (root / "aclImdb").is_dir() else root
        for file in (base / ("train" if split == "unsup" else split)).glob("*/*.txt"):
            m = REVIEW_PATH.search("aclImdb/" + file.relative_to(base).as_posix())
            if m and _split_of(m[1], m[2]) == split:
                reviews.append(_review(*m.groups(), file.read_text(encoding="utf-8")))
    if not reviews:
        raise DataError(f"--data {root}: no {split} reviews found (expected aclImdb/{split}/{{pos,neg}}/<id>_<rating>.txt)")
    return sorted(reviews, key=lambda r: (r.label, r.id))


def train_val_split(reviews: list[Review], val_fraction: float = 0.05, seed: int = 0) -> tuple[list[Review], list[Review]]:
    """Hold out a seeded `val_fraction` of every class (for validation NELBO). Returns (train, val)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in sorted({r.label for r in reviews}):
        group = [r for r in reviews if r.label == label]
        order = rng.permutation(len(group))
        n_val = round(len(group) * val_fraction)
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return train, val


def balanced_subset(reviews: list[Review], limit: int, seed: int = 0) -> list[Review]:
    """`limit` labeled reviews, limit/2 per class, drawn by review id as in shared/data/README.md.

    rng = numpy.random.default_rng(seed); pos ids = rng.choice(n_pos, limit/2, replace=False), then
    neg ids from the same generator. With limit 1000 and seed 0 on the test split this is subset C.
    Raises DataError if limit is odd or larger than a class allows.
    """
    if limit % 2:
        raise DataError(f"--limit {limit}: must be even (half per class)")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in (CLASSES.index("pos"), CLASSES.index("neg")):  # subset C draws pos first
        by_id = {r.id: r for r in reviews if r.label == label}
        if limit // 2 > len(by_id):
            raise DataError(f"--limit {limit}: only {len(by_id)} {CLASSES[label]} reviews in this split")
        chosen += [by_id[i] for i in rng.choice(len(by_id), limit // 2, replace=False)]
    return chosen


# ---- tokens -----------------------------------------------------------------------------------
def clean(text: str) -> str:
    """IMDB marks line breaks as HTML `<br />`; a newline is what the text means (and 1.6 tokens fewer)."""
    return text.replace("<br />", "\n")


def get_tokenizer():
    """tiktoken's GPT-2 BPE (50257 tokens). Offline: set TIKTOKEN_CACHE_DIR to a cache folder."""
    import tiktoken
    return tiktoken.get_encoding("gpt2")


def check_vocab(vocab_size: int, source: str) -> None:
    """Raise DataError unless the model's vocabulary is GPT-2's 50257 tokens + the mask token."""
    n_vocab = get_tokenizer().n_vocab
    if vocab_size != n_vocab + 1:
        raise DataError(f"{source}: vocab_size {vocab_size} does not match the GPT-2 tokenizer "
                        f"({n_vocab} tokens + 1 mask token = {n_vocab + 1})")


def encode(texts: list[str], max_len: int) -> list[list[int]]:
    """Cleaned texts -> GPT-2 token ids (no BOS/EOS), each truncated to its first max_len tokens."""
    enc = get_tokenizer()
    return [ids[:max_len] for ids in enc.encode_ordinary_batch([clean(t) for t in texts])]


def collate(token_lists: list[list[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: x0 long [B, L] (padding id 0, never read) and attention_mask bool [B, L]."""
    L = max(len(ids) for ids in token_lists)
    x0 = torch.zeros(len(token_lists), L, dtype=torch.long)
    attention_mask = torch.zeros(len(token_lists), L, dtype=torch.bool)
    for i, ids in enumerate(token_lists):
        x0[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, :len(ids)] = True
    return x0.to(device), attention_mask.to(device)


def length_batches(lengths: list[int], batch_size: int, rng: np.random.Generator | None = None) -> list[list[int]]:
    """Index batches of similar length, so little compute goes to padding.

    Without rng: indices sorted by length, cut into batches (evaluation). With rng: shuffled,
    sorted within pools of 50 batches, cut, and the batch order shuffled (training).
    """
    if rng is None:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    order = rng.permutation(len(lengths))
    pool = 50 * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]
