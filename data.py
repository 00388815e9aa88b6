"""Labeled text datasets, GPT-2 BPE, windows of long texts, and length-bucketed batches.

`--data PATH` is one of
- IMDB (Maas et al. 2011): Stanford's `aclImdb_v1.tar.gz` or its extracted `aclImdb` folder; without
  a path, the `IMDB_PATH` environment variable, else a download from Stanford into
  ~/.cache/mdlm-classifier. Splits train, test and unsup (unlabeled); classes neg = 0, pos = 1.
- a JSONL file (one JSON object per line) or a CSV file (with a header row) holding a text field
  and a label field (`--text-field`, `--label-field`; default `text` and `label`);
- a folder with one sub-folder of `.txt` files per class (the sub-folder's name is the label).
Labels are names (JSON numbers become strings); class index = position among the sorted names.
A dataset without splits gets a seeded, stratified test split: 10% of each labeled class (seed 0)
is held out as 'test', the rest is 'train'; its rows with an empty (or null) label are its
'unsup' split (unlabeled texts, used by train.py --class all).

Tokens: tiktoken's `gpt2` encoding without BOS/EOS (mdlm-owt-noeos was trained without them);
the mask token is id 50257 = the model's vocab_size - 1. `<br />` tags become newlines everywhere
(training, validation and classification see the same text). Texts longer than the model's
context (`model_length`: 1024 tokens for `small`, which holds 98% of IMDB reviews whole; 512 for
`tiny`, 87%) are never truncated: training takes a random window of model_length tokens at each
visit (`crop`), scoring splits the text into disjoint windows (`windows`) and sums their NELBOs.
"""
import argparse
import csv
import json
import os
import re
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
CLASSES = ("neg", "pos")
SPLITS = ("train", "test", "unsup")
TEST_FRACTION = 0.1  # held out as the test split of a dataset without splits
# aclImdb/<split>/<label>/<id>_<rating>.txt ; unsup lives in train/unsup
REVIEW_PATH = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg|unsup)/(\d+)_(\d+)\.txt$")


MISSING = object()  # a JSONL key or CSV cell that is not there at all (an error), unlike an empty label (unlabeled)


class DataError(ValueError):
    """Data that cannot be used as asked; the message names the path or argument."""


# a text without a label: Review.label (the model's masked label slot is index n_classes, model.py; the
# Python API's is None, scoring.score_texts and DiffusionClassifier.fit)
UNLABELED = -1


@dataclass
class Review:
    """One text of any dataset (the name is IMDB's)."""
    text: str
    label: int   # index into the dataset's class names; UNLABELED for unlabeled (unsup) reviews
    id: int      # IMDB: the <id> of <id>_<rating>.txt; other datasets: position in the file (or folder)
    rating: int  # IMDB: 1-4 neg, 7-10 pos, 0 unsup; other datasets: 0


def imdb_path(path: str | None = None) -> Path:
    """The local tarball or folder: `path`, else $IMDB_PATH, else Stanford's tarball downloaded once to a cache.
    Raises DataError for a path that does not exist and for a failed download (offline: name a local copy)."""
    source = "--data" if path else "$IMDB_PATH"
    path = path or os.environ.get("IMDB_PATH")
    if path:
        if not os.path.exists(path):
            raise DataError(f"{source} {path}: no such file or folder "
                            "(expected aclImdb_v1.tar.gz or its extracted folder)")
        return Path(path)
    target = Path.home() / ".cache" / "mdlm-classifier" / "aclImdb_v1.tar.gz"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(IMDB_URL, str(target))  # writes a temp file, then renames
        except OSError as e:  # URLError, socket errors (offline), a read-only home
            raise DataError(f"could not download IMDB from {IMDB_URL} ({type(e).__name__}); "
                            "offline, pass --data or set "
                            "IMDB_PATH to a local aclImdb_v1.tar.gz") from None
    return target


def _split_of(split_dir: str, label_dir: str) -> str:
    return "unsup" if label_dir == "unsup" else split_dir


def _review(split_dir, label_dir, rid, rating, text) -> Review:
    return Review(text, UNLABELED if label_dir == "unsup" else CLASSES.index(label_dir), int(rid), int(rating))


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
            raise DataError(f"--data {root}: not a tar archive (expected aclImdb_v1.tar.gz, a .jsonl or .csv file, "
                            "or a folder of class sub-folders)")
        with tarfile.open(root) as tar:
            for member in tar:  # one pass over the gzip stream (~6 s for the whole archive)
                m = REVIEW_PATH.search(member.name)
                if member.isfile() and m and _split_of(m[1], m[2]) == split:
                    reviews.append(_review(*m.groups(),
                                           decode_utf8(tar.extractfile(member).read(), f"{root}:{member.name}")))
    else:
        base = root / "aclImdb" if (root / "aclImdb").is_dir() else root
        for file in (base / ("train" if split == "unsup" else split)).glob("*/*.txt"):
            m = REVIEW_PATH.search("aclImdb/" + file.relative_to(base).as_posix())
            if m and _split_of(m[1], m[2]) == split:
                reviews.append(_review(*m.groups(), decode_utf8(file.read_bytes(), file)))
    if not reviews:
        raise DataError(f"--data {root}: no {split} reviews found "
                        f"(expected aclImdb/{split}/{{pos,neg}}/<id>_<rating>.txt)")
    return sorted(reviews, key=lambda r: (r.label, r.id))


def decode_utf8(raw: bytes, where) -> str:
    """raw bytes -> str; DataError naming `where` (file, line) if they are not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def utf8_lines(raw: bytes, where) -> list[tuple[int, str]]:
    """(line number from 1, text) of every line of raw; DataError naming `where` and the line if
    one is not UTF-8. Splits on \\n, \\r\\n and \\r only, so the numbers match an editor's."""
    return [(n, decode_utf8(line, f"{where} line {n}")) for n, line in enumerate(raw.splitlines(), 1)]


def positive(kind=int):
    """An argparse `type`: a number > 0 (int: >= 1), so `--batch-size 0` or `--lr -1` is a one-line usage error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def add_data_args(parser, from_checkpoint: bool = False) -> None:
    """The dataset flags every CLI shares: --data, --text-field, --label-field (from_checkpoint: the
    tool's --data defaults to its checkpoint's training data, cli.checkpoint_data; its help says so)."""
    default = "the checkpoint's training data, else " if from_checkpoint else ""
    parser.add_argument("--data", metavar="PATH",
                        help=f"aclImdb tarball or folder (default: {default}$IMDB_PATH, else download), "
                        "a .jsonl or .csv file, or a folder with one sub-folder of .txt files per class")
    parser.add_argument("--text-field", default="text", metavar="KEY", help="JSONL key / CSV column holding the text")
    parser.add_argument("--label-field", default="label", metavar="KEY",
                        help="JSONL key / CSV column holding the label")


def load_dataset(path: str | None, split: str, text_field: str = "text",
                 label_field: str = "label") -> tuple[list[Review], list[str]]:
    """The texts of one split ('train', 'test' or 'unsup') of any dataset, and its class names.

    path: an aclImdb tarball or folder (None: $IMDB_PATH or the download), a .jsonl or .csv file,
    or a folder of class sub-folders (see the module docstring). IMDB: load_imdb, classes
    ['neg', 'pos']. Otherwise read_labeled, then 'test' is TEST_FRACTION of each class held out
    by train_val_split with seed 0, 'train' the rest, 'unsup' the unlabeled rows. Raises DataError as
    load_imdb and read_labeled do.
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if path is None or _is_imdb(Path(path)):
        return load_imdb(split, path), list(CLASSES)
    reviews, names = read_labeled(path, text_field, label_field)
    train, test = train_val_split([r for r in reviews if r.label != UNLABELED], TEST_FRACTION, seed=0)
    if split == "test" and not test:
        raise DataError(f"{path}: the test split is empty "
                        f"(it holds out {TEST_FRACTION:.0%} of each class, which rounds "
                        "to none for classes this small); pass a separate --test-data")
    return {"train": train, "test": test, "unsup": [r for r in reviews if r.label == UNLABELED]}[split], names


def check_source(path: str | None, flag: str = "--data") -> None:
    """Raise DataError (naming `flag`) unless the data at `path` can be had: a file or folder that exists,
    or (None / IMDB) load_imdb's tarball, downloaded here if it is not yet (imdb_path)."""
    if path is not None and not os.path.exists(path):
        raise DataError(f"{flag} {path}: no such file or folder")
    if path is None or _is_imdb(Path(path)):
        imdb_path(path)


def _is_imdb(path: Path) -> bool:
    """An aclImdb folder (or one holding it), or a file that is not .jsonl/.csv (the tarball)."""
    if path.is_file():
        return path.suffix.lower() not in (".jsonl", ".csv")
    return path.name == "aclImdb" or (path / "aclImdb").is_dir()


def read_labeled(path: str, text_field: str = "text", label_field: str = "label") -> tuple[list[Review], list[str]]:
    """Every text of a dataset without splits, in file order (a folder: by class, then file name),
    and its class names (the sorted labels). Review.id = position, rating = 0.

    JSONL: one object per line, blank lines skipped; CSV: a header row naming the columns; both
    need a non-empty text under `text_field` and a string or integer label under `label_field`;
    an empty or null label marks an unlabeled text (Review.label UNLABELED, not a class).
    A folder: <path>/<label>/*.txt. Raises DataError naming the file (and line) for a missing
    path, an unknown file type, text that is not UTF-8, a bad JSON line, a missing column,
    field, text or label, or a dataset with no (labeled) text.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"{path}: no such file or folder")
    suffix = root.suffix.lower()
    if root.is_file() and suffix not in (".jsonl", ".csv"):
        raise DataError(f"{path}: expected a .jsonl or .csv file, "
                        "or a folder with one sub-folder of .txt files per class")
    try:
        rows = list(_folder_rows(root) if root.is_dir() else jsonl_rows(root, text_field, label_field)
                    if suffix == ".jsonl" else csv_rows(root, text_field, label_field))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not rows:
        raise DataError(f"{path}: no texts (expected JSONL/CSV rows, or <label>/*.txt files)")
    for where, text, label in rows:
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: no text in field {text_field!r} (set --text-field)")
        if label is MISSING or isinstance(label, bool) or not isinstance(label, (str, int, type(None))):
            raise DataError(f"{where}: no string or integer label in field {label_field!r} (set --label-field)")
    names = sorted({str(label) for _, _, label in rows if label not in (None, "")})
    if not names:
        raise DataError(f"{path}: no labeled text (every label in field {label_field!r} is empty; set --label-field)")
    index = {name: c for c, name in enumerate(names)}
    return [Review(text, UNLABELED if label in (None, "") else index[str(label)], i, 0)
            for i, (_, text, label) in enumerate(rows)], names


def jsonl_rows(path: Path, text_field: str, label_field: str):
    """(where, text, label) of every non-blank line; text None and label MISSING where the key is missing."""
    for n, line in utf8_lines(path.read_bytes(), path):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
            yield f"{path} line {n}", row.get(text_field), row.get(label_field, MISSING)


def csv_rows(path: Path, text_field: str, label_field: str | None):
    """(where, text, label) of every data row; label MISSING in a row too short to have it, or
    always with label_field None (texts only: the label column need not exist)."""
    csv.field_size_limit(2**31 - 1)  # long texts: the default limit is 128 KiB per field
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for field, flag in ((text_field, "--text-field"), (label_field, "--label-field")):
            if field is not None and field not in columns:
                raise DataError(f"{path}: no column {field!r} in the header row "
                                f"(columns: {', '.join(columns) or 'none'}); "
                                f"a CSV's first row names its columns, or set {flag}")
        try:
            for row in reader:
                label = MISSING if label_field is None or row[label_field] is None else row[label_field]
                yield f"{path} line {reader.line_num}", row[text_field], label
        except csv.Error as e:
            raise DataError(f"{path} line {reader.line_num}: {e}") from None


def _folder_rows(root: Path):
    """(file, text, sub-folder name) of every <root>/<label>/*.txt."""
    for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for file in sorted(folder.glob("*.txt")):
            yield str(file), decode_utf8(file.read_bytes(), file), folder.name


def train_val_split(reviews: list[Review], val_fraction: float = 0.05,
                    seed: int = 0) -> tuple[list[Review], list[Review]]:
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


def balanced_subset(reviews: list[Review], limit: int, seed: int = 0, flag: str = "--limit") -> list[Review]:
    """`limit` labeled texts, the same number from each of the C classes present, as in shared/data/README.md.

    rng = numpy.random.default_rng(seed); classes are drawn from the highest index down (IMDB: pos,
    then neg), each by rng.choice(n_c, limit / C, replace=False) over its texts sorted by id. On
    IMDB (ids 0..n-1 per class), limit 1000 and seed 0 on the test split give subset C.
    Raises DataError (naming `flag`) if limit is not a multiple of C or larger than a class allows.
    """
    labels = sorted({r.label for r in reviews if r.label != UNLABELED}, reverse=True)
    if limit % len(labels):
        raise DataError(f"{flag} {limit}: must be a multiple of the {len(labels)} classes (the same number per class)")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in labels:
        group = sorted((r for r in reviews if r.label == label), key=lambda r: r.id)
        if limit // len(labels) > len(group):
            raise DataError(f"{flag} {limit}: only {len(group)} texts of class {label} in this split")
        chosen += [group[i] for i in rng.choice(len(group), limit // len(labels), replace=False)]
    return chosen


def labeled_limit(train: list[Review], n: int, seed: int = 0) -> tuple[list[Review], list[Review]]:
    """Few labels: keep n labeled texts of `train`, n / C per class (balanced_subset with `seed`),
    and turn every other labeled text into an unlabeled one (label UNLABELED; texts already unlabeled stay
    so). Returns (labeled, unlabeled), the unlabeled in their input order. train.py and baselines.py
    both call it on train_val_split's train part, so for one seed they train on the same n labels.
    Raises DataError (--labeled-limit) as balanced_subset."""
    chosen = balanced_subset(train, n, seed, flag="--labeled-limit")
    keep = {id(r) for r in chosen}
    return chosen, [r if r.label == UNLABELED else replace(r, label=UNLABELED) for r in train if id(r) not in keep]


# ---- tokens -----------------------------------------------------------------------------------
def clean(text: str) -> str:
    """IMDB marks line breaks as HTML `<br />`; a newline is what the text means (and 1.6 tokens fewer)."""
    return text.replace("<br />", "\n")


def get_tokenizer():
    """tiktoken's GPT-2 BPE (50257 tokens), downloaded once into tiktoken's cache. Raises DataError
    when it can be neither read from the cache nor downloaded (offline: set TIKTOKEN_CACHE_DIR)."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ValueError) as e:  # requests' ConnectionError is an OSError; a corrupt cache file a ValueError
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        where = f"TIKTOKEN_CACHE_DIR={cache} does not hold it" if cache else "TIKTOKEN_CACHE_DIR is not set"
        raise DataError(f"could not load the GPT-2 BPE ({type(e).__name__}; {where}): offline, set TIKTOKEN_CACHE_DIR "
                        "to a folder with tiktoken's cached gpt2 files") from None


def check_vocab(vocab_size: int, source: str) -> None:
    """Raise DataError unless the model's vocabulary is GPT-2's 50257 tokens + the mask token."""
    n_vocab = get_tokenizer().n_vocab
    if vocab_size != n_vocab + 1:
        raise DataError(f"{source}: vocab_size {vocab_size} does not match the GPT-2 tokenizer "
                        f"({n_vocab} tokens + 1 mask token = {n_vocab + 1})")


def encode(texts: list[str], max_len: int | None = None) -> list[list[int]]:
    """Cleaned texts -> GPT-2 token ids (no BOS/EOS): every token, or the first max_len (a prompt).
    Raises DataError for a text with no tokens (nothing to train on or score)."""
    tokens = get_tokenizer().encode_ordinary_batch([clean(t) for t in texts])
    empty = [i for i, ids in enumerate(tokens) if not ids]
    if empty:
        raise DataError(f"text {empty[0] + 1} has no tokens after cleaning; nothing to score")
    return [ids[:max_len] for ids in tokens]


def windows(ids: list[int], max_len: int) -> list[list[int]]:
    """Split a text's tokens into the fewest disjoint, contiguous windows of <= max_len tokens,
    of near-equal size (lengths differ by at most 1), in order; [ids] itself when it fits."""
    k = max(1, -(-len(ids) // max_len))
    return [ids[len(ids) * w // k:len(ids) * (w + 1) // k] for w in range(k)]


def crop(ids: list[int], max_len: int, generator: torch.Generator) -> list[int]:
    """A training window: ids when it fits, else max_len tokens from a uniformly random start
    (one draw from `generator`, made only for a text longer than max_len)."""
    if len(ids) <= max_len:
        return ids
    start = int(torch.randint(len(ids) - max_len + 1, (1,), generator=generator))
    return ids[start:start + max_len]


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
