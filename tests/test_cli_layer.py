"""cli.py's plumbing as the tools use it: no abbreviated flags, and a checkpoint's own training data as
the default --data of eval.py and variance.py (cli.checkpoint_data)."""
import argparse
import json

import pytest

import cli
import data
import eval as eval_cli
import train
import variance
from conftest import LANGUAGES, make_languages

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread
NAMES = sorted(LANGUAGES)


def test_a_prefix_of_a_flag_is_refused(capsys):
    """--max-step is no --max-steps: a one-line usage error, not 3 steps taken silently."""
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(["--class", "all", "--out", "x", "--max-step", "3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert "error: unrecognized arguments: --max-step 3 (see " in err and "--help)" in err


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """langs.jsonl (20 texts per language under the keys "sentence" and "lang": 2 per language in its
    test split) and a joint checkpoint trained on it for 2 steps (it need not be good, only trained there)."""
    root = tmp_path_factory.mktemp("checkpoint_data")
    jsonl = write_jsonl(root / "langs.jsonl", [{"sentence": r["text"], "lang": r["label"]} for r in make_languages(20)])
    train.main(["--data", str(jsonl), "--text-field", "sentence", "--label-field", "lang", "--class", "all",
                "--init", "scratch", "--preset", "tiny", "--max-steps", "2", "--batch-size", "8", "--eval-every", "2",
                "--val-reviews", "2", "--out", str(root / "all")])
    return jsonl, root / "all"


@pytest.fixture
def no_imdb(tmp_path, monkeypatch):
    """IMDB unreachable: a tool that fell back to it would fail (rather than download it)."""
    monkeypatch.setenv("IMDB_PATH", str(tmp_path / "no_imdb"))


def test_eval_scores_the_checkpoints_own_data_without_data(trained, tmp_path, no_imdb, capsys):
    jsonl, ckpt = trained
    out = tmp_path / "ppl.json"
    eval_cli.main(["--ckpt", str(ckpt), "--mc-samples", "1", "--json", str(out)])
    summary = json.loads(out.read_text())
    test = data.load_dataset(str(jsonl), "test", "sentence", "lang")[0]  # the recorded fields: read as trained
    assert summary["data"] == str(jsonl) and [r["data"] for r in summary["results"]] == NAMES
    assert [t["n_tokens"] for t in summary["texts"]] == [len(ids) for ids in data.encode([r.text for r in test])]
    assert f"--data {jsonl} (the training data of {ckpt})" in capsys.readouterr().err
    # a flag given wins: another file's texts under the default fields, or a field of its own
    other = write_jsonl(tmp_path / "other.jsonl", make_languages(10, seed=5))
    eval_cli.main(["--ckpt", str(ckpt), "--data", str(other), "--mc-samples", "1", "--json", str(out)])
    summary = json.loads(out.read_text())
    assert summary["data"] == str(other) and len(summary["texts"]) == 3
    with pytest.raises(SystemExit):
        eval_cli.main(["--ckpt", str(ckpt), "--label-field", "topic", "--mc-samples", "1"])
    assert f"error: {jsonl} line 1: no string or integer label in field 'topic'" in capsys.readouterr().err


def test_training_data_moved_away_is_one_line_naming_data(trained, capsys):
    jsonl, ckpt = trained
    moved = jsonl.rename(jsonl.with_name("moved.jsonl"))
    try:
        with pytest.raises(SystemExit) as exit_:
            eval_cli.main(["--ckpt", str(ckpt), "--mc-samples", "1"])
    finally:
        moved.rename(jsonl)
    assert exit_.value.code == 1
    assert capsys.readouterr().err == f"error: no --data given, and {ckpt}'s training data {jsonl} is not there: " \
                                      "pass --data\n"


def test_variance_measures_the_checkpoints_own_held_out_texts(trained, tmp_path, no_imdb):
    jsonl, ckpt = trained
    out = tmp_path / "variance.json"
    variance.main(["--ckpt", str(ckpt), "--limit", "3", "--ks", "1", "--replicates", "2", "--json", str(out)])
    assert json.loads(out.read_text())["n_texts"] == 3  # one held-out text per language of langs.jsonl


def test_a_checkpoint_trained_on_imdb_keeps_imdb(tmp_path):
    """train_args' data None (IMDB, $IMDB_PATH) and a checkpoint without train_args (a hub model) change nothing."""
    for name, config in (("imdb", {"train_args": {"data": None, "text_field": "text"}}), ("hub", {})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        args = argparse.Namespace(data=None, text_field="text", label_field="label")
        cli.checkpoint_data(args, [str(tmp_path / name)])
        assert vars(args) == {"data": None, "text_field": "text", "label_field": "label"}


def test_eval_mc_samples_help_says_what_k_is_to_eval(capsys):
    with pytest.raises(SystemExit):
        eval_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--mc-samples K K Monte-Carlo draws of each text's NELBO, the same for every checkpoint (default: 4)" in text
