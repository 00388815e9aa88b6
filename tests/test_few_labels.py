"""Few labels with many unlabeled texts, and the novelty score's AUROC (train.py --labeled-limit,
data.labeled_limit, baselines.py --labeled-limit, train.MicroBatches, calibration.auroc)."""
import argparse
import json

import numpy as np
import pytest

import calibration
import data
import train
from conftest import run_script

baselines = pytest.importorskip("baselines")  # scikit-learn: the [test] extra


def test_auroc_of_a_hand_computed_case_with_ties():
    # pairs (other > inside): 2 vs 1 wins, 2 vs 2 ties (1/2), 2 vs 3 loses; 4 beats all three: 4.5 / 6
    assert calibration.auroc([1, 2, 3], [2, 4]) == 0.75
    assert calibration.auroc([1, 1], [1, 1, 1]) == 0.5  # all ties: chance
    assert calibration.auroc([0, 1], [2, 3]) == 1.0 and calibration.auroc([2, 3], [0, 1]) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        calibration.auroc([], [1.0])


def args_for(tree, n, seed=0, unlabeled=True, cls="all"):
    return argparse.Namespace(data=str(tree), labeled_limit=n, seed=seed, unlabeled=unlabeled, text_field="text", label_field="label",
                              cls=cls)


def key(r):
    return (r.label, r.id, r.text)


def test_labeled_limit_keeps_n_over_c_per_class_and_turns_the_rest_unlabeled(imdb_tree):
    reviews = data.load_imdb("train", str(imdb_tree))
    train_texts, val = train.training_texts(args_for(imdb_tree, 4), reviews, None)
    labeled = [r for r in train_texts if r.label >= 0]
    assert sorted(np.bincount([r.label for r in labeled])) == [2, 2]  # N / C per class
    # every other train text of train_val_split's train part is in the unlabeled pool, with the unsup split
    part = data.train_val_split(reviews)[0]
    pool = [r for r in train_texts if r.label < 0]
    assert len(pool) == len(part) - 4 + 3
    assert {r.text for r in pool} | {r.text for r in labeled} == {r.text for r in part} | {"an unlabeled review"}
    # no validation or test text anywhere in training
    test_texts = {r.text for r in data.load_imdb("test", str(imdb_tree))}
    assert not ({r.text for r in train_texts} & ({r.text for r in val} | test_texts))
    # --no-unlabeled: the labeled texts alone
    only = train.training_texts(args_for(imdb_tree, 4, unlabeled=False), reviews, None)[0]
    assert sorted(map(key, only)) == sorted(map(key, labeled))


def test_a_class_model_with_few_labels_trains_on_its_share_of_the_joint_models_labels(imdb_tree):
    reviews = data.load_imdb("train", str(imdb_tree))
    for seed in (0, 1):
        joint = [r for r in train.training_texts(args_for(imdb_tree, 6, seed), reviews, None)[0] if r.label >= 0]
        for c in (0, 1):
            ours = train.training_texts(args_for(imdb_tree, 6, seed, unlabeled=False, cls=str(c)), reviews, c)[0]
            assert sorted(map(key, ours)) == sorted(key(r) for r in joint if r.label == c) and len(ours) == 3
    everything = train.training_texts(args_for(imdb_tree, None, unlabeled=False, cls="0"), reviews, 0)[0]
    assert len(everything) > 3  # no limit: every class-0 train text


def test_baselines_train_on_exactly_train_pys_labeled_texts(imdb_tree):
    reviews = data.load_imdb("train", str(imdb_tree))
    picks = []
    for seed in (0, 1):
        ours = [r for r in train.training_texts(args_for(imdb_tree, 6, seed), reviews, None)[0] if r.label >= 0]
        theirs = baselines.training_reviews(str(imdb_tree), 6, seed)
        assert sorted(map(key, theirs)) == sorted(map(key, ours))
        picks.append(sorted(map(key, ours)))
    assert picks[0] != picks[1]  # the seed draws the labels: the comparison above is not vacuous
    assert len(baselines.training_reviews(str(imdb_tree))) == 24  # no limit: every train review


def test_labeled_limit_errors_name_the_flag(imdb_tree):
    reviews = data.load_imdb("train", str(imdb_tree))
    with pytest.raises(data.DataError, match="--labeled-limit 5: must be a multiple of the 2 classes"):
        train.training_texts(args_for(imdb_tree, 5), reviews, None)
    result = run_script("train.py", "--class", "0", "--unlabeled", "--out", "x")
    assert result.returncode == 2 and "--unlabeled: applies to --class all" in result.stderr


def test_every_micro_batch_holds_half_labels_however_few():
    unlabeled = np.ones(1000, dtype=bool)
    unlabeled[::84] = False  # 12 labels among 1,000 texts
    batches = train.MicroBatches(list(range(1, 1001)), unlabeled, 8, seed=0)
    for m in range(30):  # 30 micro-batches: 10 epochs of the labels, under a third of one of the rest
        batch = batches(m)
        assert len(batch) == 8 and sum(not unlabeled[i] for i in batch) == 4, m
    # the unlabeled pool is walked through too: no unlabeled text twice in one epoch of it (988 / 4 batches)
    seen = [i for m in range(247) for i in batches(m) if unlabeled[i]]
    assert len(seen) == len(set(seen)) == 988
    # one pool (every text labeled): plain batches of 8, the same as before pools existed
    plain = train.MicroBatches([5] * 40, np.zeros(40, dtype=bool), 8, seed=3)
    assert plain(0) == [int(i) for i in data.length_batches([5] * 40, 8, np.random.default_rng([3, 0]))[0]]


def test_train_records_its_labels_and_refuses_to_resume_with_another_limit(imdb_tree, tmp_path):
    out = tmp_path / "few"
    common = ["--class", "all", "--data", imdb_tree, "--init", "scratch", "--preset", "tiny", "--batch-size", "4",
              "--val-reviews", "1", "--eval-every", "1"]
    result = run_script("train.py", *common, "--max-steps", "1", "--labeled-limit", "4", "--out", out)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["n_labeled"] == 4 and config["n_unlabeled"] == 22 - 4 + 3
    assert config["train_args"]["labeled_limit"] == 4 and config["train_args"]["unlabeled"] is True
    result = run_script("train.py", *common, "--max-steps", "2", "--labeled-limit", "6", "--out", out, "--resume")
    assert result.returncode == 1 and "--labeled-limit 4 (now 6)" in result.stderr


def test_novelty_data_needs_texts_only(tmp_path):
    from classify import read_texts
    (tmp_path / "plain.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "label": 3}\n')
    assert read_texts(str(tmp_path / "plain.jsonl")) == (["one", "two"], [0, 1])
    (tmp_path / "plain.csv").write_text("text\nthree\n")
    assert read_texts(str(tmp_path / "plain.csv")) == (["three"], [0])
    (tmp_path / "bad.jsonl").write_text('{"body": "one"}\n')
    with pytest.raises(data.DataError, match="bad.jsonl line 1: no text in field 'text'"):
        read_texts(str(tmp_path / "bad.jsonl"))
