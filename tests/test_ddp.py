"""torchrun on CPU (gloo, 2 processes): the same training run and the same scores as 1 process.
The CLIs run with CUDA hidden, so a GPU machine tests the same CPU path (and one GPU cannot host 2 NCCL ranks)."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
from conftest import run_script
from convert_hf import save_checkpoint
from model import DiT, PRESETS

# losses, grad norms, NELBOs (relative and absolute) and weights. Measured: weights 7.5e-9 apart, grad norm 1.2e-7
# relative (float32 sums in another order). A bug moves them by far more than 1e-5: gradients averaged once too
# often halve the grad norm (planted: 2.73 against 1.37), another micro-batch is another gradient.
TOLERANCE = 1e-5


CPU = {"CUDA_VISIBLE_DEVICES": ""}


def torchrun(script, *args):
    return run_script(script, *args, env=CPU, launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))


def train_args(tree, out, *extra):
    return ["--class", "1", "--data", tree, "--init", "scratch", "--preset", "tiny", "--lr", "1e-3", "--max-steps", 4, "--warmup-steps", 2,
            "--batch-size", 2, "--eval-every", 2, "--val-reviews", 2, "--out", out, *extra]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from conftest import make_imdb_tree
    return make_imdb_tree(tmp_path_factory.mktemp("ddp") / "imdb")


@pytest.mark.parametrize("model", ["pos", "all"])
def test_two_processes_follow_the_one_process_trajectory(tree, tmp_path, model):
    """A class model, and the joint model with the hybrid objective (its one forward pass over the
    noisy and the clean copies, the cross-entropy normalised by the step's labeled texts)."""
    extra = ("--class", "all", "--disc-weight", "1") if model == "all" else ()
    one = run_script("train.py", *train_args(tree, tmp_path / "one", "--grad-accum", 2, *extra), env=CPU)
    assert one.returncode == 0, one.stderr
    two = torchrun("train.py", *train_args(tree, tmp_path / "two", *extra))  # default --grad-accum: one micro-batch per process
    assert two.returncode == 0, two.stderr
    assert "on cpu x 2" in two.stdout and two.stdout.count(f"class {model}") == 1  # rank 0 alone reports
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("one", "two")]
    assert [r["step"] for r in logs[1]] == [0, 1, 2, 3, 4]
    keys = ("disc_loss", "val_accuracy_posterior") if model == "all" else ()
    for key in ("loss", "grad_norm", "val_nats_per_token", *keys):
        a, b = ([r[key] for r in log if key in r] for log in logs)
        assert len(a) == len(b) > 0 and np.allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE), (key, a, b)
    sa, sb = (load_file(tmp_path / run / "train_state.safetensors") for run in ("one", "two"))
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) <= TOLERANCE
    if model == "all":  # the posterior readout gathers its windows' results from both processes
        args = ["--ckpt", tmp_path / "one", "--data", tree, "--limit", 8, "--batch-size", 2, "--readout", "posterior"]
        single = run_script("classify.py", *args, "--json", tmp_path / "p1.json", env=CPU)
        double = torchrun("classify.py", *args, "--json", tmp_path / "p2.json")
        assert single.returncode == 0 and double.returncode == 0, single.stderr + double.stderr
        a, b = (json.loads((tmp_path / f"p{n}.json").read_text()) for n in (1, 2))
        assert a["readout"] == "posterior" and b["processes"] == 2
        pa, pb = (np.array([t["posterior"] for t in s["texts"]]) for s in (a, b))
        assert pa.shape == (8, 2) and np.abs(pa - pb).max() <= TOLERANCE


def test_grad_accum_must_split_over_the_processes(tree, tmp_path):
    result = torchrun("train.py", *train_args(tree, tmp_path / "bad", "--grad-accum", 3))
    assert result.returncode != 0
    assert result.stderr.startswith("error: --grad-accum 3: must be a multiple of the 2 processes")
    assert result.stderr.count("error: --grad-accum") == 1 and not (tmp_path / "bad").exists()


def test_classify_splits_texts_over_processes_and_gathers_them(tree, tmp_path):
    for c, name in enumerate(data.CLASSES):
        torch.manual_seed(c)
        model = DiT(PRESETS["tiny"])
        save_checkpoint(model.state_dict(), model.config, tmp_path / name,
                        {"class_index": c, "class_name": name, "classes": list(data.CLASSES)})
    args = ["--ckpt0", tmp_path / "neg", "--ckpt1", tmp_path / "pos", "--data", tree, "--limit", 12, "--mc-samples", 2,
            "--batch-size", 4]
    one = run_script("classify.py", *args, "--json", tmp_path / "one.json", env=CPU)
    assert one.returncode == 0, one.stderr
    two = torchrun("classify.py", *args, "--json", tmp_path / "two.json")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("confusion matrix") == 1
    a, b = (json.loads((tmp_path / f"{run}.json").read_text()) for run in ("one", "two"))
    assert b["processes"] == 2 and a["confusion_matrix"] == b["confusion_matrix"]
    nelbo_a, nelbo_b = (np.array([t["nelbo"] for t in s["texts"]]) for s in (a, b))
    assert nelbo_a.shape == (12, 2) and np.abs(nelbo_a - nelbo_b).max() <= 2e-4  # --json rounds them to 4 decimals


def test_more_processes_than_gpus_is_one_line(monkeypatch, capsys):
    import cli
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit):
        cli.init_distributed()
    assert capsys.readouterr().err.startswith("error: torchrun started process 1 on a machine with 1 GPU(s): pass --nproc_per_node=1")


def test_atat_on_two_processes_follows_one(tree, tmp_path):
    """--objective atat under torchrun: the estimator is a second DDP module (its own process group)."""
    atat = ("--objective", "atat", "--lr-schedule", "cosine")
    one = run_script("train.py", *train_args(tree, tmp_path / "one", "--grad-accum", 2, *atat), env=CPU)
    assert one.returncode == 0, one.stderr
    two = torchrun("train.py", *train_args(tree, tmp_path / "two", *atat))
    assert two.returncode == 0, two.stderr
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("one", "two")]
    for key in ("loss", "grad_norm", "estimator_loss", "estimator_grad_norm", "tilt", "val_nats_per_token"):
        a, b = ([r[key] for r in log if key in r] for log in logs)
        assert len(a) == len(b) > 0 and np.allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE), (key, a, b)
    sa, sb = (load_file(tmp_path / run / "train_state.safetensors") for run in ("one", "two"))
    assert any(k.startswith("estimator.") for k in sa) and max(float((sa[k] - sb[k]).abs().max()) for k in sa) <= TOLERANCE
