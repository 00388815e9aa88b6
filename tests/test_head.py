"""model.FinalLayer: the full and the adaptive-softmax output heads, and the frequency ranks that
train.py gives the adaptive one."""
import math

import numpy as np
import pytest
import torch

import diffusion
from convert_hf import CheckpointError, load_hf, save_checkpoint
from model import DiT, DiTConfig
from scoring import score_texts
from test_eval import TEXTS, exact_nelbo
from train import frequency_rank

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def random_model(cfg: DiTConfig, seed: int = 0) -> DiT:
    """DiT(cfg) with every weight randomised (the zero-initialised ones too) and, for an adaptive
    head, a random token_rank: a test of the id <-> rank mapping must not see the identity."""
    torch.manual_seed(seed)
    model = DiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        if cfg.adaptive_head:
            model.output_layer.token_rank.copy_(torch.randperm(cfg.vocab_size - 1))
        else:
            model.output_layer.linear.bias[-1] = 8.0  # a mask-token logit that would show if it entered the normaliser
    return model


GPT2 = DiTConfig(model_length=16, hidden_dim=32, cond_dim=16, n_blocks=1, n_heads=2, adaptive_head=4096)


@torch.no_grad()
def test_adaptive_head_is_normalised_over_the_50257_real_tokens():
    model = random_model(GPT2)
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    log_p = model(x, torch.zeros(2))  # [2, 16, 50258]: the adaptive head's logits are log-probabilities
    total = log_p[..., :-1].double().exp().sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
    assert (log_p[..., -1] <= diffusion.NEG_INFINITY / 2).all()  # the mask token is never predicted
    # and the distribution is not uniform: the test would see a head that ignores its input
    assert log_p[..., :-1].std() > 0.5


@pytest.mark.parametrize("adaptive_head", [0, 4], ids=["full", "adaptive"])
@torch.no_grad()
def test_target_log_probs_equal_subs_of_the_logits(adaptive_head):
    """The NELBO path (targets given: no [N, V] log-probabilities) and the sampling path (logits,
    then SUBS's masked_log_probs) give the same log p_theta(x0_i | x_t)."""
    cfg = DiTConfig(vocab_size=64, model_length=16, hidden_dim=32, cond_dim=16, n_blocks=1, n_heads=2, adaptive_head=adaptive_head)
    model = random_model(cfg)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 63, (3, 16), generator=g)
    masked = torch.rand(3, 16, generator=g) < 0.5
    xt = torch.where(masked, 63, x0)
    logits = model(xt, torch.zeros(3), output_mask=masked)
    via_logits = diffusion.masked_log_probs(logits, 63).gather(-1, x0[masked][:, None])[:, 0]
    direct = model(xt, torch.zeros(3), output_mask=masked, targets=x0[masked])
    torch.testing.assert_close(direct, via_logits, atol=1e-5, rtol=1e-5)


def test_nelbo_with_the_adaptive_head_is_unbiased():
    """The time estimator against exact enumeration over every mask (test_eval.exact_nelbo), for
    a 63-token vocabulary split [4 head | 12 | 47] by a random frequency ranking."""
    model = random_model(DiTConfig(vocab_size=64, model_length=8, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2,
                                   adaptive_head=4), seed=2)
    copies = 1000
    est = score_texts([model], TEXTS * copies, 4, 0, batch_size=256, device="cpu")[:, 0].reshape(copies, len(TEXTS))
    for j, ids in enumerate(TEXTS):
        exact = exact_nelbo(model, ids)
        se = est[:, j].std(ddof=1) / math.sqrt(copies)
        assert abs(est[:, j].mean() - exact) < 4 * se, f"text {j}: MC {est[:, j].mean():.3f} vs exact {exact:.3f} (se {se:.3f})"
        assert se < 0.03 * exact


def test_frequency_rank_puts_the_most_frequent_tokens_first():
    rank = frequency_rank([[5, 5, 5, 2], [2, 7, 5]], 10)
    # 5 (4 times) -> rank 0, 2 (twice) -> 1, 7 (once) -> 2, then the unseen ids in id order
    assert rank.tolist() == [3, 4, 1, 5, 6, 0, 7, 2, 8, 9]


def test_token_rank_is_saved_and_checked(tmp_path):
    cfg = DiTConfig(vocab_size=64, model_length=8, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2, adaptive_head=4)
    model = random_model(cfg)
    save_checkpoint(model.state_dict(), cfg, tmp_path / "ok")
    loaded = load_hf(str(tmp_path / "ok"))
    assert torch.equal(loaded.output_layer.token_rank, model.output_layer.token_rank)
    x = torch.randint(0, 63, (1, 8))
    torch.testing.assert_close(loaded(x, torch.zeros(1)), model(x, torch.zeros(1)))
    state = model.state_dict()
    state["output_layer.token_rank"] = torch.zeros(63, dtype=torch.long)  # not a permutation
    save_checkpoint(state, cfg, tmp_path / "bad")
    with pytest.raises(CheckpointError, match="token_rank is not a permutation"):
        load_hf(str(tmp_path / "bad"))
