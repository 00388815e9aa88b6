"""baselines.py on what train.py reads (data.load_dataset): a 3-class JSONL with renamed fields, and
IMDB as before."""
import json

import numpy as np
import pytest

pytest.importorskip("sklearn")
import baselines
import data
from conftest import LANGUAGES, make_languages


def test_baselines_on_a_three_class_jsonl(tmp_path):
    """20 texts per language: its held-out test split is 2 of each, the other 18 train."""
    path = tmp_path / "langs.jsonl"
    path.write_text("".join(json.dumps({"body": r["text"], "lang": r["label"]}) + "\n" for r in make_languages(20)))
    out = tmp_path / "baselines.json"
    baselines.main(["--data", str(path), "--text-field", "body", "--label-field", "lang", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["classes"] == sorted(LANGUAGES) and doc["n_train"] == 54 and doc["n_test"] == 6
    assert sorted(doc["models"]) == ["MNB", "NB-LR", "TF-IDF + LR"]
    for name, result in doc["models"].items():
        # disjoint vocabularies: every model right on every text (the LRs: one per class against the rest)
        assert result["accuracy"] == 1.0 and result["confusion_matrix"] == (2 * np.eye(3, dtype=int)).tolist(), name
    baselines.main(["--data", str(path), "--text-field", "body", "--label-field", "lang", "--labeled-limit", "9",
                    "--json", str(out)])
    assert json.loads(out.read_text())["n_train"] == 9  # train.py --labeled-limit 9's 3 per class


def test_baselines_on_imdb_train_on_its_train_split_and_score_its_test_split(imdb_tree, tmp_path):
    out = tmp_path / "baselines.json"
    baselines.main(["--data", str(imdb_tree), "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["classes"] == ["neg", "pos"]
    assert (doc["n_train"], doc["n_test"]) == (len(data.load_imdb("train", str(imdb_tree))), 24)  # unsup left out
    assert all(np.array(r["confusion_matrix"]).sum(1).tolist() == [12, 12] for r in doc["models"].values())


def test_a_bad_data_file_is_one_line(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "a b"}\n')
    with pytest.raises(SystemExit) as exit_:
        baselines.main(["--data", str(tmp_path / "d.jsonl")])
    assert exit_.value.code == f"error: {tmp_path / 'd.jsonl'} line 1: no string or integer label in field 'label' " \
                              "(set --label-field)"
