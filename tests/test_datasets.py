"""Datasets beyond IMDB (JSONL, CSV, class folders), N classes, long texts and the Python API,
end to end on a toy dataset of three "languages" with disjoint vocabularies (conftest.LANGUAGES)."""
import csv
import json
import re

import numpy as np
import pytest

import classify
import data
import eval as eval_cli
import scoring
import train
from classify import DiffusionClassifier
from conftest import LANGUAGES, make_languages
from data import DataError, Review

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread
NAMES = sorted(LANGUAGES)  # class index = position among the sorted label names


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path, rows, fields=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        writer.writerows([row["text"], row["label"]] for row in rows)
    return path


def write_folder(root, rows):
    for i, row in enumerate(rows):
        (root / row["label"]).mkdir(parents=True, exist_ok=True)
        (root / row["label"] / f"{i:03d}.txt").write_text(row["text"], encoding="utf-8")
    return root


# ---- reading -------------------------------------------------------------------------------
def test_jsonl_csv_and_folder_hold_the_same_dataset(tmp_path):
    rows = make_languages(4) + [{"text": 'a "quoted", two-line\ntext, with commas', "label": "colors"}]
    expected = [(row["text"], row["label"]) for row in rows]
    for path in (write_jsonl(tmp_path / "d.jsonl", rows), write_csv(tmp_path / "d.csv", rows)):
        reviews, names = data.read_labeled(str(path))
        assert names == NAMES
        assert [(r.text, names[r.label]) for r in reviews] == expected
        assert [r.id for r in reviews] == list(range(len(rows)))
    reviews, names = data.read_labeled(str(write_folder(tmp_path / "folder", rows)))
    assert names == NAMES  # a folder lists class by class, each in file-name order
    assert [(r.text, names[r.label]) for r in reviews] == sorted(expected, key=lambda e: NAMES.index(e[1]))


def test_fields_can_be_renamed_and_labels_can_be_numbers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "a b", "y": 2}, {}, {"sentence": "c", "y": 10}][::2])
    reviews, names = data.read_labeled(str(path), text_field="sentence", label_field="y")
    assert names == ["10", "2"] and [r.label for r in reviews] == [1, 0]  # names sort as strings
    path = write_csv(tmp_path / "d.csv", [{"text": "x y", "label": "b"}, {"text": "z", "label": "a"}], ("body", "topic"))
    reviews, names = data.read_labeled(str(path), "body", "topic")
    assert names == ["a", "b"] and [(r.text, r.label) for r in reviews] == [("x y", 1), ("z", 0)]


def test_a_dataset_without_splits_gets_a_seeded_stratified_test_split(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", make_languages(30)))
    train_part, names = data.load_dataset(path, "train")
    test, _ = data.load_dataset(path, "test")
    assert names == NAMES and len(test) == 9 and [sum(r.label == c for r in test) for c in range(3)] == [3, 3, 3]
    assert sorted(r.id for r in train_part + test) == list(range(90))  # disjoint, and every text is somewhere
    assert [r.id for r in data.load_dataset(path, "test")[0]] == [r.id for r in test]  # the same for every run
    assert data.load_dataset(path, "unsup")[0] == []


def test_aclimdb_keeps_its_own_splits_and_class_order(imdb_tree):
    test, names = data.load_dataset(str(imdb_tree), "test")
    assert names == ["neg", "pos"] and len(test) == 24
    assert [(r.text, r.label, r.id) for r in test] == [(r.text, r.label, r.id) for r in data.load_imdb("test", str(imdb_tree))]


@pytest.mark.parametrize("name, content, words", [
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", label}\n', ["line 2", "not valid JSON"]),
    ("d.jsonl", '{"text": "a"}\n', ["line 1", "'label'", "--label-field"]),
    ("d.jsonl", '{"text": " ", "label": "x"}\n', ["line 1", "'text'", "--text-field"]),
    ("d.jsonl", '["a", "x"]\n', ["line 1", "JSON object"]),
    ("d.csv", "body,label\na,x\n", ["no column 'text' in the header row", "body, label", "--text-field"]),
    ("d.csv", "text,label\na,x\nb\n", ["line 3", "'label'"]),
    ("d.jsonl", "\n", ["no texts"]),
    ("d.txt", "a text\n", ["not a tar archive", ".jsonl or .csv"]),
    ("missing.csv", None, ["no such file"]),
    ("empty_folder", "", ["no texts"]),
])
def test_bad_datasets_are_named(tmp_path, name, content, words):
    path = tmp_path / name
    if content == "":
        path.mkdir()
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        data.load_dataset(str(path), "train")
    assert str(path) in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_balanced_subset_of_three_classes():
    reviews = [Review("", label, i, 0) for i, label in enumerate(np.random.default_rng(1).integers(0, 3, 300))]
    subset = data.balanced_subset(reviews, 12)
    rng = np.random.default_rng(0)  # the IMDB recipe, generalised: highest class first, by position in id order
    expected = []
    for label in (2, 1, 0):
        ids = sorted(r.id for r in reviews if r.label == label)
        expected += [(label, ids[i]) for i in rng.choice(len(ids), 4, replace=False)]
    assert [(r.label, r.id) for r in subset] == expected
    with pytest.raises(DataError, match="multiple of the 3 classes"):
        data.balanced_subset(reviews, 10)


# ---- training and classifying the toy dataset ----------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """langs.jsonl (50 texts per language; 15 held out as its test split) and one tiny class model per
    language, trained from scratch for 6 steps at a high learning rate."""
    root = tmp_path_factory.mktemp("toy")
    jsonl = write_jsonl(root / "langs.jsonl", make_languages(50))
    for name in NAMES:
        train.main(["--data", str(jsonl), "--class", name, "--init", "scratch", "--preset", "tiny", "--lr", "1e-2",
                    "--warmup-steps", "1", "--max-steps", "6", "--batch-size", "8", "--eval-every", "6",
                    "--val-reviews", "2", "--out", str(root / name)])
    return root, jsonl, [str(root / name) for name in NAMES]


def test_three_languages_are_learned_from_a_jsonl_file(toy, capsys):
    root, jsonl, ckpts = toy
    config = json.loads((root / "colors" / "config.json").read_text())
    assert config["classes"] == NAMES and config["class_name"] == "colors" and config["class_index"] == 1
    out = root / "result.json"
    classify.main([*(a for c in ckpts for a in ("--ckpt", c)), "--data", str(jsonl), "--mc-samples", "2", "--json", str(out),
                   "--readout", "nelbo"])  # the MDLMs alone: NB-LR beside them would pass the accuracy bar by itself
    summary = json.loads(out.read_text())
    assert summary["classes"] == NAMES and summary["n_texts"] == 15 and summary["split"] == "test"
    assert summary["readout"] == "nelbo" and "components" not in summary
    assert [sum(row) for row in summary["confusion_matrix"]] == [5, 5, 5]
    assert summary["accuracy"] >= 0.7  # chance: 1/3 (11 of 15: P < 1e-3); measured 0.87-1.0 over training seeds 0-7
    assert "animals" in capsys.readouterr().out


def test_novelty_of_class_models_is_the_mixture_bound_over_classes(toy):
    _, _, ckpts = toy
    clf = DiffusionClassifier.from_checkpoints(ckpts, device="cpu", mc_samples=4)
    rows = make_languages(4, seed=3)
    tokens = data.encode([r["text"] for r in rows] + ["table chair lamp desk sofa shelf table lamp"])
    novelty = clf.novelty_encoded(tokens, draws=4)
    nelbo = scoring.score_draws(clf.models, tokens, 4, clf.seed, 16, "cpu").mean(-1) / np.array([len(t) for t in tokens])[:, None]
    n = np.array([len(t) for t in tokens])
    # -log sum_c exp(-NELBO_c) / C lies between the best class's NELBO and it plus log C (same draws)
    assert np.all(novelty >= nelbo.min(1) - 1e-9) and np.all(novelty <= nelbo.min(1) + np.log(3) / n + 1e-9)
    assert novelty[-1] > novelty[:-1].max()  # an unseen vocabulary: more novel than every in-domain text


def test_python_api_predicts_names_deterministically(toy):
    _, _, ckpts = toy
    # the MDLMs alone (Bayes rule over their NELBOs), not the ensemble with NB-LR their folders also hold
    clf = DiffusionClassifier.from_checkpoints(ckpts, device="cpu", mc_samples=2, readout="nelbo")
    assert clf.classes == NAMES and clf.combine == "mdlm"
    rows = make_languages(4, seed=1)  # texts no model has seen
    texts = [row["text"] for row in rows]
    predicted = clf.predict(texts)
    assert np.mean([p == row["label"] for p, row in zip(predicted, rows)]) >= 0.8  # measured 1.0 over training seeds 0-7
    proba, nelbo = clf.predict_proba(texts), clf.class_scores(texts)
    assert proba.shape == nelbo.shape == (12, 3)
    # Bayes rule with a uniform prior: the most probable class is the one with the lowest bound
    assert (proba.argmax(1) == nelbo.argmin(1)).all() and [clf.classes[c] for c in nelbo.argmin(1)] == predicted
    assert (nelbo > 0).all()  # nats
    # the same seed, the same draws (the same numbers up to float32 rounding, whose order a long process may change)
    np.testing.assert_allclose(clf.class_scores(texts), nelbo, rtol=1e-5, atol=0)
    other = DiffusionClassifier(clf.models, clf.classes, mc_samples=2, seed=1).class_scores(texts[:2])
    assert np.abs(other - nelbo[:2]).max() > 1e-2  # another seed, other draws: not a rounding difference
    long = " ".join(LANGUAGES["numbers"] * 70)  # 560 tokens: two windows of the tiny preset's 512
    assert clf.predict([long]) == ["numbers"]
    with pytest.raises(DataError, match="text 2 has no tokens"):
        clf.class_scores(["cat", ""])


def test_separate_test_csv_with_renamed_columns_and_a_long_text(toy, tmp_path):
    _, _, ckpts = toy
    rows = [row for row in make_languages(3, seed=2) if row["label"] != "animals"]
    rows.append({"text": " ".join(LANGUAGES["colors"] * 70), "label": "colors"})  # 560 tokens: 2 windows
    path = write_csv(tmp_path / "test.csv", rows, ("sentence", "lang"))
    out = tmp_path / "result.json"
    classify.main([*(a for c in ckpts for a in ("--ckpt", c)), "--test-data", str(path), "--text-field", "sentence",
                   "--label-field", "lang", "--mc-samples", "2", "--json", str(out), "--readout", "nelbo"])  # the MDLMs alone
    summary = json.loads(out.read_text())
    assert summary["data"] == str(path) and summary["n_texts"] == 7 and summary["windowed_texts"] == 1
    assert summary["readout"] == "nelbo"
    assert sorted({t["label"] for t in summary["texts"]}) == ["colors", "numbers"]  # mapped by name onto the checkpoints' classes
    assert [t["id"] for t in summary["texts"]] == list(range(7)) and summary["texts"][-1]["text"] == rows[-1]["text"]
    assert summary["accuracy"] >= 0.8  # measured 1.0 over training seeds 0-7


def test_eval_confusion_of_likelihoods_on_a_class_folder(toy, tmp_path):
    _, _, ckpts = toy
    folder = write_folder(tmp_path / "test", make_languages(2, seed=3))
    out = tmp_path / "ppl.json"
    eval_cli.main([*(a for c in ckpts for a in ("--ckpt", c)), "--test-data", str(folder), "--mc-samples", "2", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    for language in NAMES:  # each language is best explained by its own model (by 4.3+ nats/token over seeds 0-7)
        row = {r["name"]: r["nats_per_token"] for r in results if r["data"] == language}
        assert min(row, key=row.get) == language, row


def test_class_all_trains_one_conditional_model_that_classify_takes_alone(toy, tmp_path, capsys):
    root, jsonl, ckpts = toy
    common = ["--data", str(jsonl), "--init", "scratch", "--preset", "tiny", "--max-steps", "1", "--val-reviews", "2"]
    train.main([*common, "--class", "all", "--out", str(tmp_path / "base")])
    assert "class all (3 classes; joint over (label, text), 0 unlabeled texts): 129 train / 6 val texts" in capsys.readouterr().out  # 150 - 15 test - 6 val
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["class_index"] is None and config["class_name"] == "all" and config["classes"] == NAMES
    assert config["n_classes"] == 3
    for main, argv, words in [
            (classify.main, ["--ckpt", str(tmp_path / "base"), "--ckpt", ckpts[1], "--ckpt", ckpts[2]],
             "a joint checkpoint .* pass it alone"),
            (classify.main, ["--ckpt", ckpts[0]], "an unconditional model; give one checkpoint per class"),
            (classify.main, ["--ckpt", ckpts[0], "--ckpt", ckpts[1]], "3 classes .* but 2 checkpoints"),
            (train.main, [*common, "--class", "birds", "--out", str(tmp_path / "x")], "--class birds: expected one of animals, colors, numbers")]:
        with pytest.raises(SystemExit):
            main(argv if main is train.main else [*argv, "--data", str(jsonl)])
        assert re.search(words, capsys.readouterr().err), words
