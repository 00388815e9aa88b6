"""diffusion: the loglinear schedule and NELBO against closed forms."""
import math

import pytest
import torch

import diffusion as D

T = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)


def test_loglinear_weight_is_one_over_t():
    torch.testing.assert_close(D.loss_weight(T), 1 / T, rtol=1e-9, atol=0)


def test_move_chance_is_linear_in_t():
    torch.testing.assert_close(D.move_chance(T), (1 - D.EPS) * T, rtol=1e-9, atol=0)


def test_dsigma_is_the_derivative_of_sigma():
    t = T.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(D.sigma(t).sum(), t)
    torch.testing.assert_close(grad, D.dsigma(T), rtol=1e-9, atol=0)


def test_mask_rate_equals_move_chance_and_spares_padding():
    t = torch.tensor([0.1, 0.5, 0.9])
    attention_mask = torch.ones(3, 20000, dtype=torch.bool)
    attention_mask[:, 15000:] = False
    masked = D.mask_positions(t, attention_mask, torch.Generator().manual_seed(0))
    assert not masked[:, 15000:].any()
    rate = masked[:, :15000].float().mean(1)
    p = D.move_chance(t)
    assert torch.all((rate - p).abs() < 4 * torch.sqrt(p * (1 - p) / 15000))


@pytest.mark.parametrize("n", [1, 7, 64])
def test_antithetic_t_covers_the_interval_evenly(n):
    t = D.antithetic_t(n, torch.Generator().manual_seed(n)).double()
    assert t.min() >= D.SAMPLING_EPS and t.max() <= 1
    u = ((t - D.SAMPLING_EPS) / (1 - D.SAMPLING_EPS)).sort().values
    # one point in each of the n strata [i/n, (i+1)/n) of [0, 1): the draws are evenly spread
    strata = torch.floor(u * n + 1e-9).long()
    assert torch.equal(strata, torch.arange(n))
    gaps = u.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / n), atol=1e-6, rtol=0)


class Oracle(torch.nn.Module):
    """A 'model' that knows x0 and puts all its mass on it (logit 1e4); it answers as model.DiT does
    when given targets: log p of each target under the softmax over the real tokens (SUBS)."""
    def __init__(self, x0, vocab_size):
        super().__init__()
        self.x0, self.config = x0, type("C", (), {"vocab_size": vocab_size, "time_conditioning": False})

    def logits(self, output_mask):
        return torch.nn.functional.one_hot(self.x0, self.config.vocab_size).float()[output_mask] * 1e4

    def forward(self, xt, sigma, attention_mask=None, output_mask=None, class_labels=None, targets=None):
        log_p = self.logits(output_mask)[:, :-1].log_softmax(-1)  # the mask token (last id) is no candidate
        return log_p.gather(-1, targets[:, None])[:, 0]


def test_perfect_predictor_has_nelbo_zero_and_uniform_has_log_v_per_masked_token():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 63, (4, 50), generator=g)
    attention_mask = torch.ones_like(x0, dtype=torch.bool)
    t = D.antithetic_t(4, g)
    masked = D.mask_positions(t, attention_mask, g)
    assert torch.all(D.nelbo(Oracle(x0, 64), x0, t, masked, attention_mask).abs() < 1e-4)

    class Uniform(Oracle):
        def logits(self, output_mask):
            return torch.zeros(int(output_mask.sum()), 64)
    expected = masked.sum(1) * math.log(63) / t  # uniform over the 63 non-mask tokens, weight 1/t
    torch.testing.assert_close(D.nelbo(Uniform(x0, 64), x0, t, masked, attention_mask), expected.float(), rtol=1e-4, atol=0)


def test_subs_zero_mask_probability_and_carry_over():
    logits = torch.randn(2, 5, 10)
    xt = torch.tensor([[9, 1, 9, 3, 4], [9, 9, 9, 9, 0]])  # 9 = mask_index
    lp = D.subs_log_probs(logits, xt, mask_index=9)
    masked = xt == 9
    assert torch.all(lp[..., 9] <= D.NEG_INFINITY / 2)  # the mask token is never predicted
    torch.testing.assert_close(lp[masked].exp().sum(-1), torch.ones(int(masked.sum())))
    unmasked = ~masked
    assert torch.all(lp[unmasked].gather(-1, xt[unmasked][:, None]) == 0)  # point mass on the observed token


def test_per_text_draws_depend_only_on_the_text_seed():
    t_a, m_a = D.per_text_draws([5, 12], k=4, seeds=[11, 22])
    t_b, m_b = D.per_text_draws([30, 12], k=4, seeds=[33, 22])
    torch.testing.assert_close(t_a[4:], t_b[4:])
    assert torch.equal(m_a[4:, :12], m_b[4:, :12])
    assert not m_a[:4, 5:].any()  # beyond a text's length nothing is masked
    u = ((t_a[:4] - D.SAMPLING_EPS) / (1 - D.SAMPLING_EPS)).sort().values
    torch.testing.assert_close(u.diff(), torch.full((3,), 0.25), atol=1e-6, rtol=0)


def test_the_training_weight_is_flat_and_agrees_with_the_nelbo_for_a_context_free_model():
    # a context-free model pays the same c nats at every masked token: E_t[w(t) move_chance(t)] c per token,
    # which is c for the NELBO's w = 1/t (up to the eps terms) and must be c for the training weight too
    t = torch.linspace(D.SAMPLING_EPS, 1, 200001, dtype=torch.float64)
    nelbo = torch.trapezoid(D.loss_weight(t) * D.move_chance(t), t) / (1 - D.SAMPLING_EPS)
    train = torch.trapezoid(D.train_weight(t) * D.move_chance(t), t) / (1 - D.SAMPLING_EPS)
    assert float(train) == pytest.approx(1.0, abs=1e-6) and float(nelbo) == pytest.approx(1.0, abs=2e-3)
    assert torch.all(D.train_weight(t) == D.train_weight(t)[0])  # no 1/t: the same weight at every t
