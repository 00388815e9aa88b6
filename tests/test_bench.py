"""bench.py: the FLOPs formula against the multiply-adds the model really does; the naive scorer's result."""
import dataclasses
from unittest import mock

import numpy as np
import pytest
import torch

import bench
import diffusion
import model as dit
import scoring
from model import DiTConfig

CFG = DiTConfig(vocab_size=97, model_length=32, hidden_dim=32, cond_dim=16, n_blocks=3, n_heads=4)


def counted_macs(model, x0, t, masked) -> int:
    """Multiply-adds of one diffusion.nelbo forward pass, counted as it runs: every F.linear call
    (rows x in_features x out_features; nn.Linear and the full head's real-token columns both call
    it) and every attention call (q k^T and weights x v: 2 x L x L x head_dim per sequence and head,
    from the qkv it is given)."""
    macs = 0

    def linear(x, weight, bias=None):
        nonlocal macs
        macs += x.numel() // weight.shape[1] * weight.numel()
        return real_linear(x, weight, bias)

    def attention(qkv, attention_mask, *args):
        nonlocal macs
        B, L, _, H, D = qkv.shape
        macs += 2 * B * H * L * L * D
        return real_attention(qkv, attention_mask, *args)

    real_attention, real_linear = dit.attention, torch.nn.functional.linear
    with mock.patch.object(dit, "attention", attention), mock.patch.object(torch.nn.functional, "linear", linear), torch.no_grad():
        diffusion.nelbo(model, x0, t, masked)
    return macs


@pytest.mark.parametrize("adaptive_head", [0, 8], ids=["full", "adaptive"])
@pytest.mark.parametrize("B,L,t", [(3, 32, [0.2, 0.5, 0.9]), (2, 9, [0.7, 0.05])])
def test_flops_per_token_matches_the_counted_multiply_adds(B, L, t, adaptive_head):
    cfg = dataclasses.replace(CFG, adaptive_head=adaptive_head)
    model = dit.DiT(cfg).eval()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, cfg.vocab_size - 1, (B, L), generator=g)
    t = torch.tensor(t)
    masked = diffusion.mask_positions(t, torch.ones(B, L, dtype=torch.bool), g)
    fraction = int(masked.sum()) / (B * L)
    ranks = x0[masked]  # token_rank is the identity in a fresh model
    shares = (float(((ranks >= 8) & (ranks < 32)).float().mean()), float((ranks >= 32).float().mean()))
    # 2 FLOPs per multiply-add, x3 for forward + backward
    assert bench.flops_per_token(cfg, L, fraction, shares) * B * L == pytest.approx(6 * counted_macs(model, x0, t, masked), rel=1e-9)


def test_masked_fraction_is_the_mean_move_chance_of_antithetic_t():
    t = diffusion.antithetic_t(100_000, torch.Generator().manual_seed(0)).double()
    assert float(diffusion.move_chance(t).mean()) == pytest.approx(bench.MASKED_FRACTION, abs=1e-5)


def test_synthetic_lengths_follow_imdb_test():
    lengths = np.array(bench.synthetic_lengths(50_000, 10_000, np.random.default_rng(0)))
    assert np.median(lengths) == pytest.approx(bench.IMDB_TEST_MEDIAN, rel=0.02)
    assert np.percentile(lengths, 90) == pytest.approx(bench.IMDB_TEST_P90, rel=0.02)
    assert lengths.mean() == pytest.approx(293, rel=0.03)  # the README's mean too: the lognormal fits the whole shape
    clipped = bench.synthetic_lengths(50_000, 512, np.random.default_rng(0))
    assert min(clipped) >= 8 and max(clipped) == 512


def test_naive_scorer_equals_score_texts():
    models = [bench.random_model(CFG, seed).eval() for seed in (0, 1)]
    g = np.random.default_rng(0)
    tokens = [g.integers(0, CFG.vocab_size - 1, n).tolist() for n in (5, 32, 17)]
    fast = scoring.score_texts(models, tokens, k=3, seed=4, batch_size=4, device="cpu", estimator="time")
    naive = bench.score_naive(models, tokens, k=3, seed=4, device="cpu", pad_to=32)
    np.testing.assert_allclose(naive, fast, rtol=1e-5)
    assert np.abs(fast[:, 0] - fast[:, 1]).min() > 1e-3  # the two random models really differ


def test_readout_table_times_both_readouts_of_one_joint_model():
    """The posterior readout takes one pass (1 'draw') per review; the NELBO rows take their K draws."""
    rows = []
    args = type("Args", (), {"seed": 0, "batch_size": 4})()
    cfg = dataclasses.replace(CFG, vocab_size=50258, adaptive_head=64)
    tokens = [list(range(5, 5 + n)) for n in (7, 12, 30, 3)]
    bench.readout_table(cfg, "cpu", args, tokens, torch.arange(cfg.vocab_size - 1), lambda title, r: rows.extend(r))
    assert [r["variant"].split(",")[0] for r in rows] == ["nelbo", "nelbo", "posterior"]
    assert [float(r["draws/review"]) for r in rows][::2] == [2.0, 1.0] and rows[0]["vs first row"] == "1.00x"
