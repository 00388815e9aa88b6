"""Bad input fails with one clear line (exit code != 0, no traceback) and loses nothing.

The CLIs run in-process: an error the code does not handle escapes as its own exception (and
fails pytest.raises(SystemExit)); a handled one is a SystemExit carrying the message, or
argparse's exit 2 with the message on stderr. The hub cases run as subprocesses, because
huggingface_hub reads its environment when imported.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import classify
import data
import diffusion
import train
from classify import DiffusionClassifier
from conftest import run_script
from convert_hf import CheckpointError, load_hf, save_checkpoint
from model import DiT, PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")


def error_of(main, *argv, capsys) -> str:
    """Run a CLI's main(argv) that must fail; returns its one-line error message."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    code = exit_.value.code
    assert code not in (0, None)
    message = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "\n" not in message and "error: " in message, message
    return message


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two untrained tiny class checkpoints (neg, pos) and a fake aclImdb tree."""
    from conftest import make_imdb_tree
    root = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    model = DiT(PRESETS["tiny"])
    for c, name in enumerate(data.CLASSES):
        save_checkpoint(model.state_dict(), model.config, root / name,
                        {"class_index": c, "class_name": name, "classes": list(data.CLASSES)})
    return root, make_imdb_tree(root / "imdb")


def classify_error(pair, *argv, capsys, ckpts=None):
    root, tree = pair
    ckpts = ckpts or (root / "neg", root / "pos")
    return error_of(classify.main, "--ckpt0", ckpts[0], "--ckpt1", ckpts[1], "--data", tree, *argv, capsys=capsys)


def train_error(pair, tmp_path, *argv, capsys, data_path=None):
    _, tree = pair
    return error_of(train.main, "--data", data_path or tree, "--init", "scratch", "--preset", "tiny", "--max-steps", 2,
                    "--batch-size", 4, "--val-reviews", 2, *argv, capsys=capsys)


# ---- checkpoints ---------------------------------------------------------------------------
def _copy_of(src, tmp_path, edit):
    folder = tmp_path / "ckpt"
    shutil.copytree(src, folder)
    edit(folder)
    return folder


def _write_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit, words", [
    (lambda f: shutil.rmtree(f), ["ckpt: no such checkpoint folder"]),
    (lambda f: (f / "config.json").unlink(), ["config.json: not found", "model.safetensors"]),
    (lambda f: (f / "model.safetensors").unlink(), ["model.safetensors: not found"]),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
     ["model.safetensors: not a readable safetensors file"]),
    (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64), ["model.safetensors: not a readable safetensors file"]),
    (lambda f: (f / "config.json").write_text('{"vocab_size": 50258,'), ["config.json: not valid JSON"]),
    (lambda f: (f / "config.json").write_bytes(b'{"a": "\xff"}'), ["config.json: not valid JSON"]),
    (lambda f: _write_config(f, n_blocks=None), ["config.json: field 'n_blocks' should be int, got None"]),
    (lambda f: _write_config(f, n_heads=0), ["config.json: field 'n_heads' should be >= 1, got 0"]),
    (lambda f: _write_config(f, n_heads=3), ["hidden_dim 128 should split into n_heads 3 heads"]),
    (lambda f: _write_config(f, dropout=1.5), ["field 'dropout' should be in [0, 1)"]),
    (lambda f: save_file({**load_file(f / "model.safetensors"), "backbone.vocab_embed.embedding":
                          torch.full((50258, 128), float("nan"))}, f / "model.safetensors"),
     ["NaN or inf in: backbone.vocab_embed.embedding"]),
])
def test_bad_checkpoint_is_named_by_classify(pair, tmp_path, capsys, edit, words):
    folder = _copy_of(pair[0] / "neg", tmp_path, edit)
    message = classify_error(pair, "--limit", 2, capsys=capsys, ckpts=(folder, pair[0] / "pos"))
    assert message.startswith("error: ")  # the checkpoint's own error, not a usage line blaming a flag
    for w in words:
        assert w in message


def test_class_checkpoints_with_different_configs_are_refused(pair, tmp_path, capsys):
    folder = _copy_of(pair[0] / "pos", tmp_path, lambda f: _write_config(f, model_length=256))
    message = classify_error(pair, capsys=capsys, ckpts=(pair[0] / "neg", folder))
    assert "differs from" in message and "model_length=256" in message


def test_a_checkpoint_path_that_is_a_file_is_named(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="weights.bin: a file; expected a checkpoint folder"):
        load_hf(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_unreachable_hub_says_how_to_pass_a_local_snapshot(pair, tmp_path, env):
    """HF_HUB_OFFLINE: no network allowed; HF_ENDPOINT on a closed local port: connection refused."""
    result = run_script("train.py", "--class", "0", "--data", pair[1], "--init", "hf", "--out", tmp_path / "out",
                        env={**env, "HF_HOME": str(tmp_path / "hf_home")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: kuleshov-group/mdlm-owt-noeos: not a folder here, and the Hugging Face hub is unreachable")
    assert "hf download kuleshov-group/mdlm-owt-noeos" in last and "--init DIR" in last


def test_a_repo_the_hub_does_not_have_is_named(tmp_path):
    """A local stand-in for the hub that answers every request as the real one does for a missing repo."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
        do_HEAD = do_GET

        def log_message(self, *args):
            pass
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        result = run_script("convert_hf.py", "--repo", "someone/nothing", "--out", tmp_path / "out",
                            env={"HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}", "HF_HOME": str(tmp_path / "hf_home")})
    finally:
        hub.shutdown()
    assert result.returncode == 1 and "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    assert result.stderr.strip().startswith("error: someone/nothing: not a folder here, and the Hugging Face hub "
                                            "refused it (RepositoryNotFoundError: ")


def test_a_missing_init_folder_is_named(pair, tmp_path, capsys):
    message = error_of(train.main, "--data", pair[1], "--class", 0, "--init", tmp_path / "runs" / "base",
                       "--out", tmp_path / "o", capsys=capsys)
    assert message == f"error: {tmp_path / 'runs' / 'base'}: no such checkpoint folder"


# ---- data ----------------------------------------------------------------------------------
def test_bad_data_paths_and_empty_splits(pair, tmp_path, capsys):
    tree = pair[1]
    assert "no such file or folder" in train_error(pair, tmp_path, "--class", 0, "--out", tmp_path / "o", capsys=capsys,
                                                   data_path=tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("not a dataset")
    assert "notes.txt: not a tar archive" in train_error(pair, tmp_path, "--class", 0, "--out", tmp_path / "o",
                                                         capsys=capsys, data_path=tmp_path / "notes.txt")
    empty = tmp_path / "empty_split"
    shutil.copytree(tree, empty)
    shutil.rmtree(empty / "aclImdb" / "test")
    (empty / "aclImdb" / "test").mkdir()
    assert "no test reviews found" in classify_error(pair, "--data", empty, capsys=capsys)
    few = tmp_path / "few.jsonl"  # 3 texts per class: 10% of 3 rounds to 0, so no test split
    few.write_text("".join(json.dumps({"text": f"text {i}", "label": lab}) + "\n" for i in range(3) for lab in "ab"))
    assert "few.jsonl: the test split is empty" in classify_error(pair, "--data", few, capsys=capsys)
    assert "class a: too few texts to hold out 5% for validation" in train_error(
        pair, tmp_path, "--class", "a", "--out", tmp_path / "o", capsys=capsys, data_path=few)


def test_non_utf8_review_file_is_named(pair, tmp_path, capsys):
    tree = tmp_path / "imdb"
    shutil.copytree(pair[1], tree)
    bad = sorted((tree / "aclImdb" / "train" / "neg").glob("*.txt"))[3]
    bad.write_bytes(b"caf\xe9 au lait")
    message = train_error(pair, tmp_path, "--class", 0, "--out", tmp_path / "o", capsys=capsys, data_path=tree)
    assert f"{bad}: not UTF-8 text" in message


def test_input_file_errors(pair, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "latin1.txt").write_bytes(b"fine\ncaf\xe9\n")
    root, _ = pair
    for name, words in [("missing.txt", "missing.txt: no such file"), ("empty.txt", "empty.txt: no text"),
                        ("blank.txt", "blank.txt: no text"), ("latin1.txt", "latin1.txt line 2: not UTF-8 text")]:
        message = error_of(classify.main, "--ckpt0", root / "neg", "--ckpt1", root / "pos", "--input", tmp_path / name,
                           capsys=capsys)
        assert f"--input {tmp_path / words}" in message
    (tmp_path / "two.txt").write_text("one text\nanother\n")
    message = error_of(classify.main, "--ckpt0", root / "neg", "--ckpt1", root / "pos", "--input", tmp_path / "two.txt",
                       "--limit", 1, capsys=capsys)
    assert "argument --input: scores every text" in message and "--limit" in message  # not silently ignored


def test_long_input_lines_are_scored_whole_in_windows(pair, tmp_path, capsys):
    """The policy for a line longer than model_length: scored in disjoint windows, and counted."""
    root, _ = pair
    long_line = "a long line " * 400  # 1200 tokens; tiny's model_length is 512
    (tmp_path / "in.txt").write_text(f"short one\n\n{long_line}\n")
    classify.main(["--ckpt0", str(root / "neg"), "--ckpt1", str(root / "pos"), "--input", str(tmp_path / "in.txt"),
                   "--mc-samples", "1", "--json", str(tmp_path / "out.json")])
    assert "2 texts from --input" in capsys.readouterr().err
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["windowed_texts"] == 1 and [t["id"] for t in summary["texts"]] == [1, 3]
    assert [t["n_tokens"] for t in summary["texts"]] == [2, len(data.encode([long_line])[0])]  # whole: 1201 > 512


def test_text_without_tokens_is_refused_by_the_api(pair):
    root, _ = pair
    clf = DiffusionClassifier.from_checkpoints([str(root / "neg"), str(root / "pos")], device="cpu", mc_samples=1)
    with pytest.raises(data.DataError, match="text 2 has no tokens"):
        clf.predict(["fine", ""])


# ---- arguments -----------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["--class", 2], "--class 2: expected one of neg, pos, an index 0..1, or all"),
    (["--class", 0, "--batch-size", 0], "argument --batch-size: must be > 0, got 0"),
    (["--class", 0, "--lr", -1e-3], "argument --lr: must be > 0, got -0.001"),
    (["--class", 0, "--lr", "nan"], "argument --lr: must be > 0, got nan"),
    (["--class", 0, "--max-steps", "ten"], "argument --max-steps: expected a positive int, got 'ten'"),
    (["--class", 0, "--warmup-steps", -1], "argument --warmup-steps: must be >= 0, got -1"),
    (["--class", 0, "--ema-decay", 1.5], "argument --ema-decay: must be in [0, 1), got 1.5"),
])
def test_bad_train_arguments(pair, tmp_path, capsys, argv, words):
    assert words in train_error(pair, tmp_path, *argv, "--out", tmp_path / "o", capsys=capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, words", [
    (["--mc-samples", 0], "argument --mc-samples: must be > 0, got 0"),
    (["--batch-size", 0], "argument --batch-size: must be > 0, got 0"),
    (["--limit", 0], "argument --limit: must be > 0, got 0"),
    (["--limit", 100], "--limit 100: only 12 texts of class 1 in this split"),
    (["--limit", 3], "--limit 3: must be a multiple of the 2 classes"),
])
def test_bad_classify_arguments(pair, capsys, argv, words):
    assert words in classify_error(pair, *argv, capsys=capsys)


# ---- numerical -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(pair, tmp_path, monkeypatch, capsys, bad):
    real, calls = diffusion.token_nll, []

    def poisoned(model, *args):  # the 3rd training micro-batch (step 3) gets a non-finite loss
        nll = real(model, *args)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:
                return nll * bad
        return nll
    monkeypatch.setattr(diffusion, "token_nll", poisoned)
    out = tmp_path / "o"
    message = train_error(pair, tmp_path, "--class", 0, "--max-steps", 4, "--eval-every", 2, "--out", out, capsys=capsys)
    assert message.startswith(f"error: loss {bad}") and "at step 3; stopped before the update" in message
    assert message.endswith(f"the last checkpoint in {out} (step 2) is intact")
    assert json.loads((out / "config.json").read_text())["step"] == 2
    assert all(torch.isfinite(p).all() for p in load_hf(str(out)).parameters())
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1, 2]
