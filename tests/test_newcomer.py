"""What a new user meets first (issue 11): Ctrl-C keeps the scored rows, running out of memory and
being offline are one-line errors naming what to change, --input takes a folder, a one-class
dataset is warned about, --help shows defaults, and output to a file is plain lines."""
import json
import re
import urllib.error

import numpy as np
import pytest
import requests
import torch

import classify
import data
import scoring
import train
from conftest import make_imdb_tree, run_script
from convert_hf import save_checkpoint
from model import DiT, PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two different untrained tiny class checkpoints (neg, pos) and a fake aclImdb tree (12 reviews per class)."""
    root = tmp_path_factory.mktemp("newcomer")
    for c, name in enumerate(data.CLASSES):
        torch.manual_seed(c)
        model = DiT(PRESETS["tiny"])
        save_checkpoint(model.state_dict(), model.config, root / name,
                        {"class_index": c, "class_name": name, "classes": list(data.CLASSES)})
    return root, make_imdb_tree(root / "imdb")


def classify_args(pair, *extra):
    root, tree = pair
    return ["--ckpt0", str(root / "neg"), "--ckpt1", str(root / "pos"), "--data", str(tree), "--mc-samples", "1",
            "--max-draws", "1", *map(str, extra)]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


FLOATS = {"posterior", "nelbo", "neg_log_posterior", "margin", "margin_se", "novelty_nats_per_token"}  # --json rows


def test_ctrl_c_writes_the_rows_scored_so_far_marked_partial(pair, tmp_path, monkeypatch, capsys):
    classify.main(classify_args(pair, "--json", tmp_path / "whole.json"))
    whole = json.loads((tmp_path / "whole.json").read_text())
    monkeypatch.setattr(classify, "SLICE_BATCHES", 2)  # x --batch-size 5: 24 texts in slices of 10, 10, 4
    real, calls = classify.DiffusionClassifier.draws, []

    def interrupted_in_slice_2(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)
    monkeypatch.setattr(classify.DiffusionClassifier, "draws", interrupted_in_slice_2)
    with pytest.raises(SystemExit) as exit_:
        classify.main(classify_args(pair, "--batch-size", 5, "--json", tmp_path / "part.json"))
    assert exit_.value.code == 130
    assert one_line(capsys).startswith("interrupted after 10 of 24 texts")
    part = json.loads((tmp_path / "part.json").read_text())
    assert part["partial"] is True and whole["partial"] is False and part["n_texts"] == 10 and part["n_texts_asked"] == 24
    # the rows kept are those of the whole run (same texts, same draws), in input order, and a fair
    # sample: the texts come in a seeded random order, not class by class
    rows = {row["id"]: row for row in whole["texts"]}
    for row in part["texts"]:  # another batch size: the same draws, float32 sums in another order
        other = rows[row["id"]]
        assert {k: v for k, v in row.items() if k not in FLOATS} == {k: v for k, v in other.items() if k not in FLOATS}
        for key in FLOATS & row.keys():
            np.testing.assert_allclose(np.array(row[key], float), np.array(other[key], float), rtol=1e-5, atol=2e-4,
                                       equal_nan=True)
    ids = [row["id"] for row in whole["texts"]]
    assert sorted(ids.index(row["id"]) for row in part["texts"]) == [ids.index(row["id"]) for row in part["texts"]]
    assert {row["label"] for row in part["texts"]} == set(data.CLASSES)
    assert sum(map(sum, part["confusion_matrix"])) == 10


def test_ctrl_c_before_any_row_exits_130_without_a_file(pair, tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(classify.DiffusionClassifier, "draws", interrupt)
    with pytest.raises(SystemExit) as exit_:
        classify.main(classify_args(pair, "--json", tmp_path / "none.json"))
    assert exit_.value.code == 130 and one_line(capsys) == "interrupted" and not (tmp_path / "none.json").exists()


OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 11978692752 bytes. Error code 12"


@pytest.mark.parametrize("error", [RuntimeError(OOM), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")])
def test_out_of_memory_names_the_batch_size(pair, tmp_path, monkeypatch, capsys, error):
    def no_memory(*args, **kwargs):
        raise error
    monkeypatch.setattr(scoring, "score_draws", no_memory)
    with pytest.raises(SystemExit):
        classify.main(classify_args(pair))
    message = one_line(capsys)
    assert message.startswith("error: out of memory (") and message.endswith("pass a smaller --batch-size")
    monkeypatch.setattr(train.diffusion, "nelbo", no_memory)
    with pytest.raises(SystemExit):
        train.main(["--class", "0", "--data", str(pair[1]), "--init", "scratch", "--preset", "tiny", "--max-steps", "1",
                    "--out", str(tmp_path / "t")])
    assert one_line(capsys).endswith("pass a smaller --batch-size (a larger --grad-accum keeps the global batch)")


def test_other_runtime_errors_are_not_dressed_as_out_of_memory(pair, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(scoring, "score_draws", bug)
    with pytest.raises(RuntimeError, match="shapes"):
        classify.main(classify_args(pair))


def test_offline_tokenizer_names_the_variable(monkeypatch, tmp_path):
    import tiktoken

    def offline(name):
        raise requests.exceptions.ConnectionError("Max retries exceeded with url: /gpt-2/encodings/main/vocab.bpe")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(data.DataError, match=r"^could not load the GPT-2 BPE \(ConnectionError; TIKTOKEN_CACHE_DIR=.*empty "
                                             r"does not hold it\): offline, set TIKTOKEN_CACHE_DIR"):
        data.encode(["a text"])


def test_offline_imdb_names_the_flag_and_variable(monkeypatch, tmp_path, capsys):
    def offline(url, dst):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached download
    monkeypatch.delenv("IMDB_PATH", raising=False)
    with pytest.raises(SystemExit):
        train.main(["--class", "0", "--init", "scratch", "--preset", "tiny", "--out", str(tmp_path / "o")])
    message = one_line(capsys)
    assert message.startswith("error: could not download IMDB from https://") and message.endswith(
        "offline, pass --data or set IMDB_PATH to a local aclImdb_v1.tar.gz")
    assert not list(tmp_path.rglob("*.tar.gz"))  # no half-written download left behind
    monkeypatch.setenv("IMDB_PATH", str(tmp_path / "nowhere.tar.gz"))
    with pytest.raises(data.DataError, match=r"^\$IMDB_PATH .*nowhere.tar.gz: no such file"):
        data.imdb_path()


def test_input_folder_scores_each_txt_file_by_name(pair, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "b.txt").write_text("the film was great wonderful")
    (folder / "a.txt").write_text("the film was awful\nand dull")  # a file is one text, line breaks included
    (folder / "notes.md").write_text("not a text to score")
    (folder / "empty.txt").write_text("  \n")
    root, _ = pair
    classify.main(["--ckpt0", str(root / "neg"), "--ckpt1", str(root / "pos"), "--input", str(folder), "--json",
                   str(tmp_path / "out.json")])
    rows = json.loads((tmp_path / "out.json").read_text())["texts"]
    assert [(r["id"], r["text"]) for r in rows] == [("a.txt", "the film was awful\nand dull"),
                                                     ("b.txt", "the film was great wonderful")]
    assert all(r["label"] is None and r["pred"] in data.CLASSES for r in rows)
    header, *lines = capsys.readouterr().out.strip().split("\n")
    assert header.split("\t")[0] == "id" and [line.split("\t")[0] for line in lines if "\t" in line][:1] == ["a.txt"]


def test_a_one_class_dataset_is_warned_about(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"text": f"text number {i}", "label": "spam"}) + "\n" for i in range(40)))
    result = run_script("train.py", "--class", "spam", "--data", path, "--init", "scratch", "--preset", "tiny",
                        "--max-steps", 1, "--warmup-steps", 0, "--batch-size", 4, "--val-reviews", 1, "--out", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    assert f"warning: {path}: every label is 'spam'; a classifier needs texts of at least two classes" in result.stderr


def test_help_shows_defaults_and_one_meaning_of_batch_size():
    def help_of(text: str, flag: str) -> str:  # the help of one option, on one line
        options = text.split("\noptions:", 1)[1]
        return " ".join(re.search(rf"\n  {flag} [A-Z_]+\s+(.*?)(?=\n  -|\Z)", options, re.S).group(1).split())
    for script, flag, default in [("train.py", "--batch-size", "16"), ("classify.py", "--mc-samples", "2"),
                                  ("eval.py", "--mc-samples", "4"), ("classify.py", "--batch-size", "16")]:
        result = run_script(script, "--help")
        assert result.returncode == 0
        assert help_of(result.stdout, flag).endswith(f"(default: {default})"), (script, flag)
        assert help_of(result.stdout, "--batch-size").startswith("texts per"), script


def test_train_help_fits_a_screen_and_help_all_shows_every_flag(tmp_path):
    import dataclasses
    short = run_script("train.py", "--help", env={"COLUMNS": "80"})
    full = run_script("train.py", "--help-all", env={"COLUMNS": "80"})
    assert short.returncode == full.returncode == 0
    assert len(short.stdout.splitlines()) <= 45  # a terminal screen, the common flags only
    flags = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(train.TrainConfig) if f.name != "cls"] + ["--class"]
    missing = [flag for flag in flags if not re.search(rf"\n  {flag}[ ,\n]", full.stdout)]
    assert not missing, missing  # every flag documented somewhere
    assert "--atat-tilt" not in short.stdout and "--help-all" in short.stdout  # hidden, and the way to see it said
    for flag in ("--class", "--out", "--init", "--data", "--labeled-limit", "--max-steps", "--resume"):
        assert f"{flag} " in short.stdout
    result = run_script("train.py", "--class", "all", "--out", tmp_path / "o", "--atat-tilt", "2")  # a hidden flag parses
    assert result.returncode == 2 and "argument --atat-tilt: must be in [0, 1), got 2.0 (see train.py --help-all)" in result.stderr
    for script in ("classify.py", "eval.py"):  # the scoring tools' advanced flags: the estimator, the precision
        short, full = (run_script(script, flag, env={"COLUMNS": "80"}).stdout for flag in ("--help", "--help-all"))
        assert "--estimator " not in short and "--precision " not in short and "--help-all" in short, script
        assert "--estimator " in full and "--precision " in full and "--mc-samples " in short, script


def test_output_to_a_file_is_plain_lines(tmp_path, pair):
    result = run_script("train.py", "--class", "0", "--data", pair[1], "--init", "scratch", "--preset", "tiny",
                        "--max-steps", 20, "--warmup-steps", 0, "--batch-size", 4, "--val-reviews", 1, "--eval-every", 20,
                        "--out", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr + result.stdout
    progress = [line for line in result.stderr.splitlines() if line.startswith("training: ")]
    assert [line.split()[2] for line in progress] == [f"{s}/20," for s in range(2, 21, 2)]


def test_every_offline_requirement_is_named_at_once_before_any_data_loads(tmp_path, monkeypatch, capsys):
    def no_tokenizer():
        raise data.DataError("could not load the GPT-2 BPE (set TIKTOKEN_CACHE_DIR)")
    monkeypatch.setattr(data, "get_tokenizer", no_tokenizer)
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the checks"))
    monkeypatch.setenv("IMDB_PATH", str(tmp_path / "nowhere.tar.gz"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_:
        train.main(["--class", "all", "--init", "hf", "--out", str(tmp_path / "o")])
    message = one_line(capsys)
    assert exit_.value.code == 1 and message.startswith("error: 3 things this command needs are missing: (1) ")
    assert "TIKTOKEN_CACHE_DIR" in message and "nowhere.tar.gz: no such file" in message
    assert "hub is unreachable" in message and "or train from scratch: --init scratch" in message
    with pytest.raises(SystemExit):
        classify.main(["--ckpt", str(tmp_path / "o")])
    message = one_line(capsys)
    assert message.startswith("error: 2 things this command needs are missing") and "nowhere.tar.gz" in message


def test_init_scratch_without_a_gpu_means_the_tiny_preset(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = train.parse_args(["--class", "all", "--init", "scratch", "--out", "x"])
    assert args.preset == "tiny" and "the tiny preset" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.parse_args(["--class", "all", "--init", "scratch", "--out", "x"]).preset == "small"
    assert train.parse_args(["--class", "all", "--init", "scratch", "--preset", "tiny", "--out", "x"]).preset == "tiny"


def test_usage_mistakes_are_one_line_pointing_to_help():
    result = run_script("train.py", "--class", "all", "--out", "x", "--batch-size", "0")
    assert result.returncode == 2
    assert result.stderr.strip() == "train.py: error: argument --batch-size: must be > 0, got 0 (see train.py --help)"
    result = run_script("classify.py", "--bogus")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "see classify.py --help" in result.stderr
