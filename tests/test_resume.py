"""Crash safety and exact resume of train.py on the tiny preset (CPU, subprocesses, a few steps)."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ROOT, make_imdb_tree, run_script, script_env
from convert_hf import load_hf

TOLERANCE = 1e-6  # max |difference| of any weight, EMA weight or AdamW moment (measured: 0.0, bitwise equal)


def train_args(tree, out, steps, *extra):
    return ["--class", "0", "--data", str(tree), "--init", "scratch", "--preset", "tiny", "--lr", "1e-3",
            "--warmup-steps", "2", "--ema-decay", "0.9", "--max-steps", str(steps), "--batch-size", "2",
            "--grad-accum", "2", "--eval-every", "2", "--val-reviews", "2", "--out", str(out), *extra]


def start(args, **popen):
    """train.py in the background, as run_script would run it."""
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=script_env(), text=True, **popen)


def steps_logged(out) -> list[int]:
    path = out / "log.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def state_step(out) -> int:
    with safe_open(out / "train_state.safetensors", "pt") as f:
        return int(f.metadata()["step"])


def exported_step(out) -> int:
    path = out / "config.json"
    return json.loads(path.read_text())["step"] if path.exists() else 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from conftest import make_imdb_tree
    root = tmp_path_factory.mktemp("resume")
    tree = make_imdb_tree(root / "imdb")
    result = run_script("train.py", *train_args(tree, root / "full", 6))
    assert result.returncode == 0, result.stderr
    return tree, root / "full"


def assert_same_state(a, b):
    sa, sb = load_file(a / "train_state.safetensors"), load_file(b / "train_state.safetensors")
    assert sa.keys() == sb.keys() and any(k.startswith("adam.") for k in sa) and any(k.startswith("ema.") for k in sa)
    worst = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    assert worst <= TOLERANCE, f"max |difference| {worst}"


def test_stopped_at_step_3_and_resumed_ends_where_an_uninterrupted_run_does(uninterrupted, tmp_path):
    tree, full = uninterrupted
    out = tmp_path / "split"
    assert run_script("train.py", *train_args(tree, out, 3)).returncode == 0
    assert state_step(out) == 3
    result = run_script("train.py", *train_args(tree, out, 6, "--resume"))
    assert result.returncode == 0, result.stderr
    assert_same_state(full, out)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    full_log = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [r["step"] for r in full_log] == [0, 1, 2, 3, 4, 5, 6]
    assert [r.get("loss") for r in log] == [r.get("loss") for r in full_log]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_exits(uninterrupted, tmp_path, sig):
    tree, full = uninterrupted
    out = tmp_path / "signal"
    proc = start(train_args(tree, out, 1000, "--eval-every", "1000"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while len(steps_logged(out)) < 2 and proc.poll() is None:  # step 0 (validation) and step 1 are logged
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig and "Traceback" not in stderr
    step = steps_logged(out)[-1]
    assert f"stopped by {sig.name} after step {step}: checkpoint saved in {out}; continue with --resume" in stderr
    assert state_step(out) == step and json.loads((out / "config.json").read_text())["step"] == step
    assert 1 <= step < 1000
    load_hf(str(out))


PAUSE_IN_SAVE = """
import os, sys, time
target, marker = os.environ["PAUSE_TARGET"], os.environ["PAUSE_MARKER"]
real_replace, seen = os.replace, []
def replace(src, dst, *args, **kwargs):  # atomic_write's rename: the .tmp is whole, the old file still in place
    if os.path.basename(str(dst)) == target:
        seen.append(dst)
        if len(seen) == 2:  # the process's first checkpoint is whole; pause inside its second
            open(marker, "w").close()
            time.sleep(600)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = ["train.py", *sys.argv[1:]]
sys.path.insert(0, os.getcwd())
import train
train.main()
"""


def test_kill_9_during_saves_leaves_the_previous_checkpoint_valid(uninterrupted, tmp_path):
    """Every step saves (--eval-every 1); the process is killed -9 while it is inside a save (paused
    just before the rename of each file of a checkpoint in turn: deterministic, not timed) and
    restarted with --resume. What remains must load every time."""
    tree, _ = uninterrupted
    out, last = tmp_path / "kill", 0
    for target in ("train_state.safetensors", "model.safetensors", "config.json"):
        marker = tmp_path / f"paused-{target}"
        proc = subprocess.Popen([sys.executable, "-c", PAUSE_IN_SAVE, *map(str, train_args(tree, out, 10_000, "--eval-every", "1",
                                                                                          *(["--resume"] if last else [])))],
                                cwd=ROOT, env={**script_env(), "PAUSE_TARGET": target, "PAUSE_MARKER": str(marker)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120  # a save that never renames (no atomic write) must fail, not hang
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if not marker.exists():
            proc.kill()
        assert marker.exists(), f"train.py never paused inside its second save of {target} (exit {proc.poll()})"
        proc.kill()
        proc.wait()
        assert any(temporary(p) for p in out.iterdir()), target  # the kill hit a write
        last = state_step(out)  # the train state reads back whole ...
        assert last >= 1 and set(load_file(out / "train_state.safetensors")) >= {"model.vocab_embed.embedding"}
        model = load_hf(str(out))  # ... and so does the EMA export
        assert all(torch.isfinite(p).all() for p in model.parameters())
    result = run_script("train.py", *train_args(tree, out, last + 1, "--eval-every", "1", "--resume"))
    assert result.returncode == 0, result.stderr
    assert steps_logged(out)[-2:] == [last, last + 1]  # the log was cut back to the checkpoint
    assert not any(temporary(p) for p in out.iterdir())  # what the killed saves left was swept


def temporary(path) -> bool:
    """convert_hf.atomic_write's NAME.tmp, or the .tmpXXXX that safetensors itself writes first."""
    return path.name.endswith(".tmp") or path.name.startswith(".tmp")


def test_resume_refuses_what_would_not_continue_the_same_run(uninterrupted, tmp_path):
    tree, full = uninterrupted
    result = run_script("train.py", *train_args(tree, tmp_path / "none", 6, "--resume"))
    assert result.returncode == 1 and "--resume: " in result.stderr and "train_state.safetensors not found" in result.stderr
    result = run_script("train.py", *train_args(tree, full, 8))  # no --resume: would overwrite
    assert result.returncode == 1 and f"--out {full} already holds a checkpoint; pass --resume" in result.stderr
    result = run_script("train.py", *train_args(tree, full, 8, "--resume", "--batch-size", "4"))
    assert result.returncode == 1 and "was trained with --batch-size 2 (now 4); these flags must not change" in result.stderr
    assert "Traceback" not in result.stderr and state_step(full) == 6


def test_a_train_state_from_before_the_adaptive_head_resumes_with_the_full_head(tmp_path):
    """A train state written before --adaptive-head existed holds a full head: resuming it with the
    preset's (now adaptive) head is refused with the flag named; --adaptive-head 0 resumes it."""
    tree = make_imdb_tree(tmp_path / "imdb")
    out = tmp_path / "old"
    assert run_script("train.py", *train_args(tree, out, 2, "--adaptive-head", "0")).returncode == 0
    state = out / "train_state.safetensors"
    with safe_open(state, "pt") as f:  # rewrite its metadata as an older version wrote it
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    old_args = {k: v for k, v in json.loads(meta["train_args"]).items() if k not in ("adaptive_head", "precision")}
    save_file(tensors, state, {**meta, "train_args": json.dumps(old_args)})
    result = run_script("train.py", *train_args(tree, out, 3, "--resume"))
    assert result.returncode == 1 and "--adaptive-head 0 (now 4096)" in result.stderr, result.stderr
    result = run_script("train.py", *train_args(tree, out, 3, "--resume", "--adaptive-head", "0"))
    assert result.returncode == 0, result.stderr


def test_ema_moves_a_fraction_one_minus_d_towards_the_weights():
    """ema <- d ema + (1 - d) w with d = min(decay, (1 + step) / (10 + step)): early steps follow the
    weights (d = 0.1 at step 0), late ones average them (d = decay)."""
    from train import ema_update
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    for step, decay, expected in [(0, 0.9999, 0.9), (10_000, 0.9, 0.1)]:
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.zero_()
                p.fill_(1.0)
        ema_update(ema, model, step, decay)
        assert all(torch.allclose(e, torch.full_like(e, expected)) for e in ema.parameters()), (step, decay)
