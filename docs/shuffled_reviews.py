"""A within-domain novelty set: IMDB test reviews with their words shuffled (same words, no order).

    python docs/shuffled_reviews.py --limit 1000 --out shuffled.jsonl   # subset C, shuffled
    python classify.py --ckpt ckpt/all --limit 1000 --novelty-data shuffled.jsonl

Each review of the balanced, seeded test subset (data.balanced_subset, as classify.py --limit)
becomes one JSONL row {"text", "label"} whose whitespace-separated words are permuted (seed 0):
its unigram counts are unchanged, so only a model of word order can tell it from the original.
"""
import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's data.py, run from anywhere
import data  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", help="aclImdb tarball or folder (default: $IMDB_PATH, else download)")
p.add_argument("--limit", type=data.positive(), default=1000, help="balanced test subset (1000 = subset C)")
p.add_argument("--out", required=True, help="JSONL file to write")
args = p.parse_args()
rng = random.Random(0)
rows = []
for review in data.balanced_subset(data.load_imdb("test", args.data), args.limit):
    words = data.clean(review.text).split()
    rng.shuffle(words)
    rows.append(json.dumps({"text": " ".join(words), "label": data.CLASSES[review.label]}))
with open(args.out, "w") as f:
    f.write("\n".join(rows) + "\n")
print(f"{len(rows)} shuffled reviews written to {args.out}")
