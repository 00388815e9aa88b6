"""train.py and classify.py end to end on the tiny preset and a fake aclImdb tree (a few steps)."""
import json

import pytest

from conftest import FIXTURE, run_script
from convert_hf import load_hf

STEPS = 30  # the two class models' training steps (lr 1e-2): they then separate the fake reviews' words


def train(tree, out, cls, steps, *extra):
    return run_script("train.py", "--class", str(cls), "--data", str(tree), "--init", "scratch", "--preset", "tiny",
               "--lr", "1e-2", "--warmup-steps", "1", "--max-steps", str(steps), "--batch-size", "4", "--eval-every", str(max(1, steps // 2)),
               "--val-reviews", "2", "--out", str(out), *extra)


@pytest.fixture(scope="module")
def class_models(tmp_path_factory):
    from conftest import make_imdb_tree
    root = tmp_path_factory.mktemp("cli")
    tree = make_imdb_tree(root / "imdb")
    for cls in (0, 1):  # enough steps to tell the fake tree's pos words from its neg words
        result = train(tree, root / f"c{cls}", cls, STEPS)
        assert result.returncode == 0, result.stderr
    return tree, root


def test_train_writes_a_loadable_checkpoint_and_a_validation_curve(class_models):
    tree, root = class_models
    config = json.loads((root / "c1" / "config.json").read_text())
    assert config["class_index"] == 1 and config["class_name"] == "pos" and config["step"] == STEPS
    log = [json.loads(line) for line in (root / "c1" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val_nats_per_token" in r] == [0, STEPS // 2, STEPS]
    assert all(r["loss"] > 0 for r in log if "loss" in r)
    # every validation beside the counts models of the same held-out texts: a run at its unigram reads no context
    assert all(r["val_bigram_nats"] < r["val_unigram_nats"] for r in log if "val_nats_per_token" in r)
    assert not load_hf(str(root / "c1")).training


def test_class_all_trains_on_every_imdb_text_including_unsup(class_models, tmp_path):
    tree, root = class_models
    result = train(tree, tmp_path / "base", "all", 1, "--warmup-steps", "100", "--unlabeled")
    assert result.returncode == 0, result.stderr
    assert "warning: --warmup-steps 100 is longer than --max-steps 1: the lr ends at 1/100 of --lr 0.01" in result.stderr
    # the default warmup never outlasts a short run (DiffusionClassifier.fit passes no warmup): silent, at full lr
    short = run_script("train.py", "--class", "all", "--data", tree, "--init", "scratch", "--max-steps", 3, "--batch-size", 4,
                       "--val-reviews", 2, "--out", tmp_path / "short")
    assert short.returncode == 0 and "warning" not in short.stderr, short.stderr
    log = [json.loads(line) for line in (tmp_path / "short" / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log if "lr" in r][-1] == 1e-3  # the recipe's lr, reached
    # 2 x (12 - 1 val) labeled + 3 unsup (--unlabeled), their label slot masked; without it, the labeled ones only
    assert "class all (2 classes; joint over (label, text), 3 unlabeled texts): 25 train / 2 val texts" in result.stdout
    plain = train(tree, tmp_path / "plain", "all", 1)
    assert "0 unlabeled texts): 22 train / 2 val texts" in plain.stdout
    assert "warning" not in plain.stderr  # warmup 1: nothing to say
    assert json.loads((tmp_path / "base" / "config.json").read_text())["classes"] == ["neg", "pos"]


def test_resume_continues_from_the_saved_step(class_models, tmp_path):
    tree, root = class_models
    import shutil
    shutil.copytree(root / "c0", tmp_path / "c0")
    result = train(tree, tmp_path / "c0", 0, STEPS, "--resume", "--max-steps", str(STEPS + 2))
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (tmp_path / "c0" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, STEPS + 3))
    assert json.loads((tmp_path / "c0" / "config.json").read_text())["step"] == STEPS + 2


def test_classify_reports_accuracy_and_confusion_matrix(class_models, tmp_path):
    tree, root = class_models
    out = tmp_path / "result.json"
    result = run_script("classify.py", "--ckpt0", str(root / "c0"), "--ckpt1", str(root / "c1"), "--data", str(tree),
                 "--limit", "8", "--mc-samples", "2", "--json", str(out), "--readout", "nelbo")  # the MDLMs alone
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    cm = summary["confusion_matrix"]
    assert [sum(row) for row in cm] == [4, 4] and summary["accuracy"] == (cm[0][0] + cm[1][1]) / 8
    # the models have learned the classes' words: a classifier that picked the worse class would score <= 2/8
    # (measured: 4 of 4 per class over training seeds 0-7)
    assert cm[0][0] >= 3 and cm[1][1] >= 3, cm
    texts, names = summary["texts"], summary["classes"]
    assert len(texts) == 8 and all(t["posterior"][names.index(t["label"])] > 0.5 for t in texts if t["pred"] == t["label"])
    assert all(t["nelbo"][names.index(t["pred"])] == min(t["nelbo"]) for t in texts)  # the decision is the lower bound's class
    # each row names its review: the file under aclImdb/ holds the row's text, in the folder of its label
    for t in texts:
        split, label, name = t["id"].split("/")
        assert split == "test" and label == t["label"] in names
        assert (tree / "aclImdb" / t["id"]).read_text() == t["text"]
    assert "confusion matrix" in result.stdout


def test_classify_user_texts_from_stdin(class_models):
    tree, root = class_models
    result = run_script("classify.py", "--ckpt0", str(root / "c0"), "--ckpt1", str(root / "c1"), "--input", "-",
                        "--readout", "nelbo",  # the MDLMs alone: NB-LR beside them would get these two right by itself
                        stdin="the film was great wonderful superb loved\n\nthe film was awful terrible boring hated\n")
    assert result.returncode == 0, result.stderr
    header, *rows = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert header == ["id", "class", "posterior", "text"]
    assert [r[0] for r in rows] == ["1", "3"] and [r[1] for r in rows] == ["pos", "neg"]  # posterior 1.0, seeds 0-7
    assert all(0.5 < float(r[2]) <= 1 for r in rows)
    assert [r[3] for r in rows] == ["the film was great wonderful superb loved", "the film was awful terrible boring hated"]
    assert "2 texts from --input -" in result.stderr


@pytest.mark.parametrize("swap, words", [
    (True, "trained for class 1, but passed as class 0"),
    (False, "vocab_size 64 does not match the GPT-2 tokenizer"),
])
def test_classify_refuses_mismatched_checkpoints(class_models, swap, words):
    tree, root = class_models
    ckpts = [root / "c1", root / "c0"] if swap else [FIXTURE, FIXTURE]
    result = run_script("classify.py", "--ckpt0", str(ckpts[0]), "--ckpt1", str(ckpts[1]), "--input", "-", stdin="text\n")
    assert result.returncode != 0 and words in result.stderr and "Traceback" not in result.stderr
