"""A base model of p(text) from every unlabeled text (train.py --class none), then fine-tuned into a
joint classifier (--class all --init BASE): labels never read, test texts never seen, every text
tensor carried over bit for bit and the new label slot named."""
import json

import pytest
import torch

import classify
import data
import train
from convert_hf import CheckpointError, load_hf
from test_few_labels import args_for

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread
COMMON = ["--init", "scratch", "--preset", "tiny", "--batch-size", "4", "--val-reviews", "1", "--warmup-steps", "0"]


def test_the_base_reads_every_train_and_unlabeled_text_and_no_label(imdb_tree):
    reviews = data.load_imdb("train", str(imdb_tree))
    texts, val = train.training_texts(args_for(imdb_tree, None, unlabeled=False, cls="none"), reviews, None)
    part, held_out = data.train_val_split(reviews)
    unsup = data.load_imdb("unsup", str(imdb_tree))
    assert sorted(r.text for r in texts) == sorted(r.text for r in part + unsup)  # the train part and the unsup split
    assert all(r.label == data.UNLABELED for r in texts)  # no label reaches the model
    assert {r.text for r in val} == {r.text for r in held_out}  # validation: the joint model's own held-out texts
    test = {r.text for r in data.load_imdb("test", str(imdb_tree))}
    assert not test & {r.text for r in texts + val}


def test_a_base_fine_tunes_into_a_joint_model_with_its_text_tensors_intact(imdb_tree, tmp_path, capsys, monkeypatch):
    base = tmp_path / "base"
    train.main(["--class", "none", "--data", str(imdb_tree), *COMMON, "--max-steps", "2", "--eval-every", "2", "--out", str(base)])
    config = json.loads((base / "config.json").read_text())
    assert config["n_classes"] == 0 and config["class_name"] == "none" and config["n_labeled"] == 0
    assert config["n_unlabeled"] == 22 + 3  # the train part (12 a class, 1 each held out) and the unsup split
    loaded = load_hf(str(base)).state_dict()
    # classify.py names the base for what it is, and the command that makes a classifier of it
    for paths, said in (([base, base], r"a base of p\(text\) \(train.py --class none\) holds no class; fine-tune it"),
                        ([base], r"a base of p\(text\): fine-tune it with train.py --class all --init DIR")):
        with pytest.raises(CheckpointError, match=said):
            classify.load_class_models([str(p) for p in paths], "cpu")

    def starts(*extra):  # the weights a fine-tune starts from, and what it says of them
        args = train.parse_args(["--class", "all", "--data", str(imdb_tree), "--init", str(base), "--out", str(tmp_path / "x"), *extra])
        model = train.init_model(args, 2, [[1, 2, 3]])
        return model.state_dict(), capsys.readouterr().err
    # the CPU recipe's defaults: a base of 4,000 steps; its fine-tune at the tiny recipe's lr, not the hub model's 2e-5
    defaults = train.parse_args(["--class", "none", "--init", "scratch", "--out", str(tmp_path / "b")])
    assert (defaults.preset, defaults.max_steps, defaults.lr) == ("tiny", train.CPU_RECIPE["base_steps"], train.CPU_RECIPE["lr"])
    defaults = train.parse_args(["--class", "all", "--init", str(base), "--out", str(tmp_path / "f")])
    assert (defaults.max_steps, defaults.lr) == (train.CPU_RECIPE["max_steps"], train.CPU_RECIPE["lr"])
    state, said = starts()
    new = sorted(k for k in state if k not in loaded)
    assert new and all(k.startswith("label_") for k in new)
    assert all(torch.equal(state[k], loaded[k]) for k in loaded)  # bit for bit, every text tensor
    assert f"a fresh label slot for 2 classes: {', '.join(new)}" in said
    # a loader that re-initialised one text tensor would be caught by the same comparison
    real = train.load_hf

    def reinitialised(path):
        model = real(path)
        torch.nn.init.normal_(model.blocks[0].attn_out.weight)
        return model
    monkeypatch.setattr(train, "load_hf", reinitialised)
    state, _ = starts()
    assert not all(torch.equal(state[k], loaded[k]) for k in loaded)
    monkeypatch.setattr(train, "load_hf", real)
    # and the fine-tune trains and validates both readouts
    train.main(["--class", "all", "--data", str(imdb_tree), "--init", str(base), "--batch-size", "4", "--val-reviews", "1",
                "--warmup-steps", "0", "--max-steps", "2", "--eval-every", "2", "--out", str(tmp_path / "all")])
    log = [json.loads(line) for line in (tmp_path / "all" / "log.jsonl").read_text().splitlines()]
    assert "val_accuracy_posterior" in log[-1] and load_hf(str(tmp_path / "all")).config.n_classes == 2


def test_the_base_refuses_what_only_a_joint_model_has(imdb_tree, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--class", "none", "--labeled-limit", "4", "--out", str(tmp_path / "o")])
    assert "--class none trains on every text" in capsys.readouterr().err
