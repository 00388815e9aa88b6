"""convert_hf: parity with the reference MDLM outputs stored in the fixture, and strictness."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusion
from conftest import FIXTURE, ROOT
from convert_hf import CheckpointError, load_hf, save_checkpoint
from model import DiT, PRESETS


@pytest.fixture(scope="module")
def expected():
    return load_file(FIXTURE / "expected.safetensors")


@pytest.fixture(scope="module")
def model():
    return load_hf(str(FIXTURE))


def test_loads_in_eval_mode_fp32(model):
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())


@torch.no_grad()
def test_logits_match_reference(model, expected):
    for sigma_key, logits_key in (("sigma_zero", "logits"), ("sigma", "logits_sigma")):
        logits = model(expected["input_ids"], expected[sigma_key])
        torch.testing.assert_close(logits, expected[logits_key], atol=1e-5, rtol=0)


@torch.no_grad()
def test_subs_log_probs_and_nelbo_match_reference(model, expected):
    logits = model(expected["input_ids"], expected["sigma_zero"])
    log_probs = diffusion.subs_log_probs(logits, expected["input_ids"], mask_index=63)
    ref = expected["log_probs_subs"]
    finite = ref > -1e5  # the -1e6 entries have float32 spacing 0.06: compare them by pattern only
    assert torch.equal(log_probs > -1e5, finite)
    torch.testing.assert_close(log_probs[finite], ref[finite], atol=1e-4, rtol=0)
    nelbo = diffusion.nelbo(model, expected["x0"], expected["t"], expected["mask"])
    torch.testing.assert_close(nelbo, expected["nelbo"], atol=1e-4, rtol=1e-6)  # NELBOs of 165-202 nats: float32 spacing 1.5e-5
    assert abs(nelbo.sum().item() / expected["x0"].numel() - expected["loss_token_mean"].item()) < 1e-5


def test_schedule_matches_reference(expected):
    t = expected["t"]
    for fn, key in ((diffusion.sigma, "sigma"), (diffusion.dsigma, "dsigma"),
                    (diffusion.move_chance, "move_chance"), (diffusion.loss_weight, "loss_weight")):
        torch.testing.assert_close(fn(t), expected[key], atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_time_conditioned_nelbo_matches_the_reference_logits(expected):
    """With time_conditioning the NELBO path feeds sigma(t) to the backbone: its NELBO is the one the
    reference's logits for (x_t, sigma) give (logits_sigma, SUBS over the 63 real tokens, weight 1/t)."""
    model = load_hf(str(FIXTURE))
    model.config.time_conditioning = True
    log_p = expected["logits_sigma"][..., :63].double().log_softmax(-1).gather(-1, expected["x0"][..., None])[..., 0]
    reference = (-log_p * expected["mask"]).sum(1) * expected["loss_weight"].double()
    torch.testing.assert_close(diffusion.nelbo(model, expected["x0"], expected["t"], expected["mask"]), reference.float(),
                               atol=1e-3, rtol=1e-5)


@torch.no_grad()
def test_a_padded_batch_matches_the_reference(model, expected):
    """The fixture's sequences with 8 padding positions appended (holding arbitrary tokens, some masked
    in x_t): the real positions' logits and the NELBO are the reference's."""
    B, L = expected["input_ids"].shape
    junk = torch.randint(0, 64, (B, 8), generator=torch.Generator().manual_seed(0))
    input_ids = torch.cat([expected["input_ids"], junk], 1)
    attention_mask = torch.cat([torch.ones(B, L, dtype=torch.bool), torch.zeros(B, 8, dtype=torch.bool)], 1)
    logits = model(input_ids, expected["sigma_zero"], attention_mask)
    torch.testing.assert_close(logits[:, :L], expected["logits"], atol=1e-5, rtol=0)
    x0 = torch.cat([expected["x0"], junk], 1)
    masked = torch.cat([expected["mask"], torch.zeros(B, 8, dtype=torch.bool)], 1)
    torch.testing.assert_close(diffusion.nelbo(model, x0, expected["t"], masked, attention_mask), expected["nelbo"], atol=1e-4, rtol=1e-6)


def test_small_preset_has_the_real_checkpoint_keys():
    with torch.device("meta"):
        state = DiT(PRESETS["small"]).state_dict()
    ours = [f"backbone.{k} {','.join(map(str, v.shape))} float32" for k, v in state.items()]
    real = (FIXTURE / "real_keys.txt").read_text().split("\n")
    assert ours == [line for line in real if line]
    assert len(ours) == 131


def _copy_with(tmp_path, edit):
    folder = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    return str(folder)


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.pop("backbone.blocks.1.norm2.weight"), ["missing", "backbone.blocks.1.norm2.weight"]),
    (lambda t: t.update({"backbone.blocks.2.norm1.weight": torch.ones(64)}), ["unexpected", "backbone.blocks.2.norm1.weight"]),
    (lambda t: t.update({"backbone.output_layer.linear.bias": torch.zeros(65)}), ["wrong shape", "backbone.output_layer.linear.bias", "(65,)"]),
    (lambda t: t.update({"backbone.rotary_emb.inv_freq": t["backbone.rotary_emb.inv_freq"] * 1.01}), ["backbone.rotary_emb.inv_freq"]),
])
def test_strict_mapping_names_the_key(tmp_path, edit, words):
    with pytest.raises(CheckpointError) as err:
        load_hf(_copy_with(tmp_path, edit))
    for w in words:
        assert w in str(err.value)


def test_optional_sampling_eps_buffers_are_accepted(tmp_path, expected):
    folder = _copy_with(tmp_path, lambda t: t.update({"sampling_eps_min": torch.tensor(1e-3), "sampling_eps_max": torch.tensor(1.0)}))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(folder)(expected["input_ids"], expected["sigma_zero"]), expected["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.pop("cond_dim"), ["config.json", "missing field 'cond_dim'"]),
    (lambda c: c.update({"n_blocks": "2"}), ["config.json", "'n_blocks'", "int"]),
])
def test_bad_config_names_the_field(tmp_path, edit, words):
    folder = _copy_with(tmp_path, lambda t: None)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    edit(config)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_hf(folder)
    for w in words:
        assert w in str(err.value)


def test_cli_writes_a_checkpoint_that_loads_back(tmp_path, expected):
    subprocess.run([sys.executable, "convert_hf.py", "--repo", str(FIXTURE), "--out", str(tmp_path / "out")],
                   cwd=ROOT, check=True, capture_output=True)
    converted = load_hf(str(tmp_path / "out"))
    with torch.no_grad():
        torch.testing.assert_close(converted(expected["input_ids"], expected["sigma_zero"]), expected["logits"], atol=1e-5, rtol=0)
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == set(load_file(FIXTURE / "model.safetensors"))


def test_save_checkpoint_round_trip(tmp_path, model):
    save_checkpoint(model.state_dict(), model.config, tmp_path / "rt", {"class_index": 1})
    again = load_hf(str(tmp_path / "rt"))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert json.loads((tmp_path / "rt" / "config.json").read_text())["class_index"] == 1


def test_checkpoint_files_are_readable_by_others(tmp_path):
    """Under the usual umask 022 every file of a checkpoint is 0644 (safetensors alone writes 0600)."""
    import os
    old = os.umask(0o022)
    try:
        save_checkpoint(load_hf(str(FIXTURE)).state_dict(), load_hf(str(FIXTURE)).config, tmp_path / "c")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "c").iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644}, modes
