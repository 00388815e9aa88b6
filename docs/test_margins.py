"""The margins of the suite's thresholds on trained toy models, over training seeds (docs/test_margins.md).

    python docs/test_margins.py                # every group, seeds 0-7 (about 10 minutes on 2 CPU cores)
    python docs/test_margins.py toy cli 4      # some groups, seeds 0-3

Each group retrains what a test trains, with --seed (or the seed of its generators) varied, and prints
the quantity the test bounds. Another CPU's float rounding is another training trajectory: a bar set
below the minimum over seeds holds there too. One thread, as under pytest-xdist.
"""
import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import numpy as np
import torch

import classify
import data
import eval as eval_cli
import scoring
import train
from classify import DiffusionClassifier
from conftest import LANGUAGES, make_imdb_tree, make_languages
from convert_hf import load_hf

NAMES = sorted(LANGUAGES)
UNSEEN = "table chair lamp desk sofa shelf table lamp chair desk"  # test_conditional's


def quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def script(name: str, *args) -> None:
    subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def language(seed: int, tmp: Path) -> str:  # test_language: a model that reads its context
    import test_language
    from eval import cross_entropy_by_t
    texts = test_language.cycle_texts(64, 40, np.random.default_rng(1))
    row = cross_entropy_by_t(test_language.train_on_cycles(seed=seed), texts, (0.1,), seed=0, batch_size=32, device="cpu")[0]
    return f"cross-entropy at t = 0.1 / log 40 = {row['nats_per_masked_token'] / math.log(40):.3f} (bar < 0.4)"


def fit(seed: int, tmp: Path) -> str:  # test_fit: DiffusionClassifier.fit, 40 steps
    rows = make_languages(40)
    texts, labels = [r["text"] for r in rows] + [r["text"] for r in make_languages(5, seed=1)], [r["label"] for r in rows] + [None] * 15
    with quiet():
        clf = DiffusionClassifier(max_steps=40, lr=1e-2, batch_size=8, eval_every=20, seed=seed, out=str(tmp / "fit")).fit(texts, labels)
    new = make_languages(10, seed=7)
    return f"accuracy {np.mean([p == r['label'] for p, r in zip(clf.predict([r['text'] for r in new]), new)]):.3f} (bar >= 0.8)"


def toy(seed: int, tmp: Path) -> str:  # test_datasets: three class models, 6 steps each
    jsonl = write_jsonl(tmp / "langs.jsonl", make_languages(50))
    ckpts = [str(tmp / name) for name in NAMES]
    with quiet():
        for name in NAMES:
            train.main(["--data", str(jsonl), "--class", name, "--init", "scratch", "--preset", "tiny", "--lr", "1e-2",
                        "--warmup-steps", "1", "--max-steps", "6", "--batch-size", "8", "--eval-every", "6",
                        "--val-reviews", "2", "--seed", str(seed), "--out", str(tmp / name)])
        flags = [a for c in ckpts for a in ("--ckpt", c)]
        classify.main([*flags, "--data", str(jsonl), "--mc-samples", "2", "--json", str(tmp / "test.json")])
        rows = make_languages(4, seed=1)
        api = np.mean([p == r["label"] for p, r in zip(DiffusionClassifier.from_checkpoints(ckpts, mc_samples=2).predict(
            [r["text"] for r in rows]), rows)])
        rows = [r for r in make_languages(3, seed=2) if r["label"] != "animals"] + [{"text": " ".join(LANGUAGES["colors"] * 70), "label": "colors"}]
        with open(tmp / "test.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerows([("sentence", "lang"), *((r["text"], r["label"]) for r in rows)])
        classify.main([*flags, "--test-data", str(tmp / "test.csv"), "--text-field", "sentence", "--label-field", "lang",
                       "--mc-samples", "2", "--json", str(tmp / "csv.json")])
        for i, r in enumerate(make_languages(2, seed=3)):
            (tmp / "folder" / r["label"]).mkdir(parents=True, exist_ok=True)
            (tmp / "folder" / r["label"] / f"{i}.txt").write_text(r["text"])
        eval_cli.main([*flags, "--test-data", str(tmp / "folder"), "--mc-samples", "2", "--json", str(tmp / "eval.json")])
    results = json.loads((tmp / "eval.json").read_text())["results"]
    gaps = []
    for language_ in NAMES:
        row = {r["name"]: r["nats_per_token"] for r in results if r["data"] == language_}
        gaps.append(min(v for k, v in row.items() if k != language_) - row[language_])
    return (f"test split {json.loads((tmp / 'test.json').read_text())['accuracy']:.3f} (bar >= 0.7), API {api:.3f} (>= 0.8), "
            f"csv {json.loads((tmp / 'csv.json').read_text())['accuracy']:.3f} (>= 0.8), own model's lead in eval.py "
            f"{min(gaps):.2f} nats/token (> 0)")


def cli(seed: int, tmp: Path) -> str:  # test_cli: two class models on the fake aclImdb tree, 30 steps
    tree = make_imdb_tree(tmp / "imdb")
    with quiet():
        for cls in (0, 1):
            train.main(["--class", str(cls), "--data", str(tree), "--init", "scratch", "--preset", "tiny", "--lr", "1e-2",
                        "--warmup-steps", "1", "--max-steps", "30", "--batch-size", "4", "--eval-every", "15",
                        "--val-reviews", "2", "--seed", str(seed), "--out", str(tmp / f"c{cls}")])
        classify.main(["--ckpt0", str(tmp / "c0"), "--ckpt1", str(tmp / "c1"), "--data", str(tree), "--limit", "8",
                       "--mc-samples", "2", "--json", str(tmp / "r.json")])
    post = DiffusionClassifier.from_checkpoints([str(tmp / "c0"), str(tmp / "c1")]).predict_proba(
        ["the film was great wonderful superb loved", "the film was awful terrible boring hated"])
    return (f"confusion matrix {json.loads((tmp / 'r.json').read_text())['confusion_matrix']} (diagonal >= 3), "
            f"stdin texts' posteriors of their class {post[0, 1]:.3f} {post[1, 0]:.3f} (> 0.5)")


def conditional(seed: int, tmp: Path) -> str:  # test_conditional: one joint model, 100 steps
    rows = make_languages(50) + [{"text": r["text"], "label": ""} for r in make_languages(10, seed=1)]
    jsonl, ckpt = write_jsonl(tmp / "langs.jsonl", rows), tmp / "all"
    with quiet():
        train.main(["--data", str(jsonl), "--class", "all", "--init", "scratch", "--preset", "tiny", "--lr", "1e-2",
                    "--warmup-steps", "1", "--max-steps", "100", "--batch-size", "8", "--eval-every", "50", "--disc-weight", "10",
                    "--val-reviews", "2", "--seed", str(seed), "--out", str(ckpt)])
    log = [r for r in map(json.loads, (ckpt / "log.jsonl").read_text().splitlines()) if "val_nats_per_token" in r]
    model, gaps = load_hf(str(ckpt)), []
    test = data.load_dataset(str(jsonl), "test")[0]
    for c in range(3):
        nelbo = scoring.score_draws([model, model], data.encode([r.text for r in test if r.label == c]), 16, 0, 16, "cpu", [c, 3]).mean(-1)
        gaps += list(nelbo[:, 1] - nelbo[:, 0])
    clf = DiffusionClassifier.from_checkpoints(str(ckpt))
    words = UNSEEN.split()
    inside = clf.novelty([r.text for r in test])
    unseen = clf.novelty([" ".join(words[i:] + words[:i]) for i in range(5)])
    script("variance.py", "--ckpt", ckpt, "--data", jsonl, "--limit", 6, "--ks", "1,16", "--replicates", 8, "--json", tmp / "v.json")
    se = {(r["estimator"], r["k"]): r["se"] for r in json.loads((tmp / "v.json").read_text())["rows"]}
    ratios = " ".join(f"{e} {se[e, 16] / se[e, 1]:.2f}" for e in scoring.ESTIMATORS)
    return (f"val NELBO drop {log[0]['val_nats_per_token'] - log[-1]['val_nats_per_token']:.2f} (> 3); no class - own class "
            f"{np.mean(gaps):.2f} nats a text (> 0.1); unseen novelty above the test texts' by {unseen.min() - inside.max():.1f} "
            f"nats/token (> 0); se(16) / se(1) {ratios} (< 0.6)")


def estimator(seed: int, tmp: Path) -> str:  # test_atat: the importance estimator ranks a planted hard token first
    import atat
    from test_atat import mean_score_per_id, toy_batch
    torch.manual_seed(seed)
    est = atat.ImportanceEstimator(atat.EstimatorConfig(vocab_size=32, width=32, layers=1, heads=4, max_length=16))
    g, (x_eval, am_eval, _, _) = torch.Generator().manual_seed(seed), toy_batch(torch.Generator().manual_seed(1), B=64)
    opt = torch.optim.Adam(est.parameters(), lr=3e-3)
    for _ in range(100):
        x0, attention_mask, masked, nll = toy_batch(g)
        loss = atat.estimator_loss(est(x0, attention_mask), atat.difficulty_target(nll, 32), masked)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mean_score_per_id(est, x_eval, am_eval)
    return f"hard token's lead {(after[7] - torch.cat([after[:7], after[8:]]).max()).item():.3f} (> 0.3)"


GROUPS = {f.__name__: f for f in (language, fit, toy, cli, conditional, estimator)}

if __name__ == "__main__":
    torch.set_num_threads(1)
    names = [a for a in sys.argv[1:] if a in GROUPS] or list(GROUPS)
    seeds = [int(a) for a in sys.argv[1:] if a.isdigit()] or [8]
    for name in names:
        for seed in range(seeds[0]):
            with tempfile.TemporaryDirectory() as tmp:
                print(f"{name:<12} seed {seed}: {GROUPS[name](seed, Path(tmp))}", flush=True)
