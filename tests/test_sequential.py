"""scoring.score_sequential: clear texts stop after the first round of draws, close ones get more,
and a text that stops holds exactly the draws of fixed-K scoring."""
import copy

import numpy as np
import pytest
import torch

from classify import DiffusionClassifier
from conftest import FIXTURE
from convert_hf import load_hf
from scoring import draws_taken as n_draws, paired_margin, score_draws, score_sequential

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread

rng = np.random.default_rng(0)
HIGH = [rng.integers(20, 63, n).tolist() for n in (6, 9, 12)]  # ids 20..62
LOW = [rng.integers(0, 20, n).tolist() for n in (7, 10)]      # ids 0..19


@pytest.fixture(scope="module")
def models():
    """The fixture model, and a copy that puts far more mass on ids 0..19: much better on LOW texts,
    much worse on HIGH ones."""
    base = load_hf(str(FIXTURE))
    low = copy.deepcopy(base)
    with torch.no_grad():
        low.output_layer.linear.bias[:20] += 6.0
    return base, low


def test_clear_texts_stop_early_and_close_ones_get_every_draw(models):
    base, low = models
    # classes 0 and 1 are the same model: on HIGH texts the best two tie on every draw (no evidence
    # either way), on LOW texts class 2 wins by many nats
    texts = LOW + HIGH  # the texts that go on are not the first: their rows in later rounds are not their indices
    draws = score_sequential([base, base, low], texts, k=4, max_draws=16, z=2.0, seed=0, batch_size=64, device="cpu")
    assert n_draws(draws).tolist() == [4] * len(LOW) + [16] * len(HIGH)
    rounds = draws[len(LOW):, 0].reshape(len(HIGH), 4, 4)
    assert all(len(np.unique(r.round(6), axis=0)) == 4 for r in rounds)  # each round has draws of its own
    for j, i in enumerate(range(len(LOW), len(texts))):  # round r of text i: its own draws of stream r, wherever it sits
        for r in (1, 3):
            alone = score_draws([base], [texts[i]], 4, 0, 64, "cpu", index=[i], stream=r)[0, 0]
            np.testing.assert_allclose(rounds[j, r], alone, rtol=1e-5)  # other draws: nats apart; float32 in another batch: 1e-7


def test_a_stopped_text_has_the_draws_and_decision_of_fixed_k(models):
    base, low = models
    texts = HIGH + LOW
    seq = score_sequential([base, low], texts, k=4, max_draws=16, z=2.0, seed=3, batch_size=5, device="cpu")
    assert (n_draws(seq) == 4).all()  # every text is clear between these two models
    fixed = score_draws([base, low], texts, 4, 3, batch_size=64, device="cpu")
    np.testing.assert_allclose(seq[:, :, :4], fixed, rtol=1e-5)
    assert np.nanmean(seq, -1).argmin(1).tolist() == [0] * len(HIGH) + [1] * len(LOW)


def test_paired_margin_uses_each_texts_own_draws():
    """A text with fewer draws (NaN after them) gets the margin and standard error of those draws alone."""
    full = np.array([[[1.0, 2.0, 4.0, 3.0], [3.0, 5.0, 5.0, 9.0]]])  # differences 2, 3, 1, 6
    cut = full.copy()
    cut[..., 2:] = np.nan
    margin, se = paired_margin(np.concatenate([full, cut]))
    np.testing.assert_allclose(margin, [3.0, 2.5])
    np.testing.assert_allclose(se, [np.std([2, 3, 1, 6], ddof=1) / 2, np.std([2, 3], ddof=1) / np.sqrt(2)])


def test_classifier_refuses_max_draws_that_are_not_whole_rounds(models):
    with pytest.raises(ValueError, match="multiple"):
        DiffusionClassifier([models[0], models[1]], ["a", "b"], mc_samples=4, max_draws=10)
