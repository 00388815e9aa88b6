"""The text model reads its context: the by-t cross-entropy, the counts yardsticks, and a model
that learns a language where each token is fixed by its neighbour (issue: the unigram plateau)."""
import math

import numpy as np
import pytest
import torch

import data
import diffusion
import model as dit
from eval import cross_entropy_by_t
from model import DiT, DiTConfig
from ngram import CountsLM

pytestmark = pytest.mark.usefixtures("one_thread")  # one trajectory whatever the machine's core count


def test_counts_models_against_counts_by_hand():
    lm = CountsLM.fit([[0, 1, 0, 1], [1, 1]], n_real=3)
    # unigram counts 2, 4, 0 of N = 6, add-1/2 over V = 3: (c + 0.5) / 7.5
    p = np.array([2.5, 4.5, 0.5]) / 7.5
    assert lm.unigram_nll([[0, 2]]) == pytest.approx(-(math.log(p[0]) + math.log(p[2])) / 2)
    # pairs (0,1) x2, (1,0), (1,1): c(0) = 2 with 1 successor, so p(1 | 0) = (2 - .75) / 2 + .75 * 1/2 * p(1)
    p1_after_0 = 1.25 / 2 + 0.75 / 2 * p[1]
    assert lm.bigram_nll([[0, 1]]) == pytest.approx(-(math.log(p[0]) + math.log(p1_after_0)) / 2)
    # c(1) = 2 with 2 successors: an unseen pair (1, 2) gets only the back-off mass .75 * 2/2 * p(2)
    assert lm.bigram_nll([[1, 2]]) == pytest.approx(-(math.log(p[1]) + math.log(0.75 * p[2])) / 2)
    # a context never seen as a predecessor (2) backs off to the unigram
    assert lm.bigram_nll([[2, 0]]) == pytest.approx(-(math.log(p[2]) + math.log(p[0])) / 2)
    with pytest.raises(ValueError, match="0..2"):
        CountsLM.fit([[0, 3]], n_real=3)


class NeighbourStub(torch.nn.Module):
    """-log p(x0_i | x_t) = 1 nat where the left neighbour is visible, 3 nats where it is masked or absent."""

    def __init__(self):
        super().__init__()
        self.config = DiTConfig(vocab_size=11, model_length=64, time_conditioning=False)

    def forward(self, xt, sigma, attention_mask=None, output_mask=None, class_labels=None, targets=None):
        mask_index = self.config.vocab_size - 1
        left_visible = torch.zeros_like(xt, dtype=torch.bool)
        left_visible[:, 1:] = xt[:, :-1] != mask_index
        if attention_mask is not None:
            left_visible[:, 1:] &= attention_mask[:, :-1]
        return -torch.where(left_visible, 1.0, 3.0)[output_mask]


def test_cross_entropy_by_t_against_the_expectation_by_hand():
    # a masked token's left neighbour is masked with probability m = move_chance(t) (the first token
    # has none): expected cross-entropy 1 + 2 m over the non-first tokens, 3 at the first
    rng = np.random.default_rng(0)
    texts = [rng.integers(0, 10, size=int(n)).tolist() for n in rng.integers(40, 120, size=60)]  # some windowed at 64
    for row in cross_entropy_by_t(NeighbourStub(), texts, (0.1, 0.5, 0.9), seed=0, batch_size=8, device="cpu"):
        m = float(diffusion.move_chance(torch.tensor(row["t"])))
        n_tokens = sum(len(ids) for ids in texts)
        assert row["masked_tokens"] == pytest.approx(m * n_tokens, rel=0.1)
        firsts = sum(-(-len(ids) // 64) for ids in texts) / n_tokens  # windows' first tokens: 3 nats always
        expected = (1 - firsts) * (1 + 2 * m) + firsts * 3
        assert row["nats_per_masked_token"] == pytest.approx(expected, abs=0.08), row


def cycle_texts(n: int, words: int, rng: np.random.Generator) -> list[list[int]]:
    """Runs of consecutive ids of a fixed cycle: each token is its left neighbour + 1 (mod words)."""
    out = []
    for _ in range(n):
        start, length = rng.integers(words), rng.integers(12, 33)
        out.append(((start + np.arange(length)) % words).tolist())
    return out


def train_on_cycles(steps: int = 150, seed: int = 0) -> DiT:
    words = 40
    cfg = DiTConfig(vocab_size=words + 1, model_length=32, hidden_dim=64, cond_dim=32, n_blocks=2, n_heads=4, dropout=0.0)
    torch.manual_seed(seed)
    model = DiT(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x0, am = data.collate(cycle_texts(32, words, rng))
        t = diffusion.antithetic_t(len(x0), g)
        masked = diffusion.mask_positions(t, am, g)
        loss = diffusion.nelbo(model, x0, t, masked, am).sum() / am.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_a_model_that_reads_its_context(monkeypatch):
    # the cycle language's unigram entropy is log(40) = 3.69 nats; with 90 % of the tokens visible
    # almost every masked token has a visible neighbour that fixes it
    texts = cycle_texts(64, 40, np.random.default_rng(1))
    ce = cross_entropy_by_t(train_on_cycles(), texts, (0.1,), seed=0, batch_size=32, device="cpu")[0]
    assert ce["nats_per_masked_token"] < 0.4 * math.log(40), ce  # measured 0.01-0.28 x log 40 over seeds 0-7


def test_the_context_test_fails_without_attention(monkeypatch):
    # the planted bug: attention output zeroed, every position sees only itself (a mask token)
    monkeypatch.setattr(dit, "attention", lambda qkv, *a, **k: torch.zeros(*qkv.shape[:2], qkv.shape[3] * qkv.shape[4]))
    texts = cycle_texts(64, 40, np.random.default_rng(1))
    ce = cross_entropy_by_t(train_on_cycles(steps=60), texts, (0.1,), seed=0, batch_size=32, device="cpu")[0]
    assert ce["nats_per_masked_token"] > 0.9 * math.log(40), ce
