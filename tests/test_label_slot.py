"""The label as a token: a joint MDLM over (label, text), its one-pass posterior readout, and the
hybrid generative-discriminative objective (model.py, diffusion.joint_nelbo / label_posterior,
scoring.score_posterior, train.step_backward)."""
import argparse

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import diffusion
import scoring
import train
from conftest import FIXTURE

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread
MASK, C = 63, 2  # fixture: vocab_size 64; two labels


def joint_fixture(seed: int = 0):
    """The Hugging Face fixture extended with a 2-label slot, its label path made non-trivial."""
    model = train.init_model(argparse.Namespace(init=str(FIXTURE), seed=seed, preset=None), n_classes=C, tokens=[])
    with torch.no_grad():
        model.label_head.weight.normal_(0, 0.5)
        model.label_head.bias.copy_(torch.tensor([0.3, -0.2]))
    return model.eval()


@torch.no_grad()
def test_an_extended_checkpoint_keeps_every_tensor_and_its_text_head_holds_no_label():
    model = joint_fixture()
    loaded = load_file(FIXTURE / "model.safetensors")
    state = model.state_dict()
    for key, value in loaded.items():  # every fixture tensor, bit for bit; only the slot is new
        assert torch.equal(state[key[len("backbone."):]], value), key
    assert sorted(set(state) - {k[len("backbone."):] for k in loaded}) == ["label_embed.weight", "label_head.bias", "label_head.weight"]
    x = load_file(FIXTURE / "expected.safetensors")["input_ids"]
    sigma = torch.zeros(len(x))
    logits, label_log_p = model(x, sigma, class_labels=torch.full((len(x),), C), label_out=True)
    # text positions: the fixture's vocabulary only (no label column), SUBS over its real tokens
    assert logits.shape == (*x.shape, 64)
    log_p = diffusion.masked_log_probs(logits, MASK)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(x.shape))
    # the slot: a C-way distribution, nothing else
    assert label_log_p.shape == (len(x), C)
    torch.testing.assert_close(label_log_p.exp().sum(-1), torch.ones(len(x)))
    # and it is context: the label held by the slot changes the text's distribution
    other = model(x, sigma, class_labels=torch.zeros(len(x), dtype=torch.long))
    assert not torch.allclose(other, logits, atol=1e-4)


def test_a_model_without_a_slot_refuses_labels():
    model = train.init_model(argparse.Namespace(init=str(FIXTURE), seed=0, preset=None), n_classes=0, tokens=[])
    x = torch.randint(0, MASK, (2, 5))
    with pytest.raises(ValueError, match="label slot"):
        model(x, torch.zeros(2), label_out=True)


def draw(seed=0, B=4, L=12):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, MASK, (B, L), generator=g)
    attention_mask = torch.ones(B, L, dtype=torch.bool)
    attention_mask[1, 7:] = False
    t = torch.rand(B, generator=g) * 0.8 + 0.1
    masked = diffusion.mask_positions(t, attention_mask, g)
    return x0, attention_mask, t, masked


@torch.no_grad()
def test_an_unlabeled_text_never_scores_the_slot():
    model = joint_fixture()
    x0, am, t, masked = draw()
    labels = torch.tensor([0, C, 1, C])  # rows 1 and 3 unlabeled
    slot_masked = torch.tensor([True, False, True, True])  # row 1's draw says unmasked: unlabeled stays masked
    got = diffusion.joint_nelbo(model, x0, t, masked, am, labels, slot_masked)
    text_only = diffusion.nelbo(model, x0, t, masked, am, torch.full((4,), C))  # slot masked, unscored
    torch.testing.assert_close(got[[1, 3]], text_only[[1, 3]], rtol=1e-6, atol=1e-5)
    # a labeled row with a masked slot pays loss_weight(t) * -log p(label | x_t) on top of its text
    _, label_log_p = model(torch.where(masked, MASK, x0), torch.zeros(4), am, output_mask=masked,
                           class_labels=torch.full((4,), C), targets=x0[masked], label_out=True)
    slot_term = diffusion.loss_weight(t[0]) * -label_log_p[0, 0]
    torch.testing.assert_close(got[0], text_only[0] + slot_term, rtol=1e-5, atol=1e-4)
    # an unmasked labeled slot is carried over (SUBS): the text's NELBO given its label, nothing more
    clamped = diffusion.joint_nelbo(model, x0, t, masked, am, labels, torch.zeros(4, dtype=torch.bool))
    given = diffusion.nelbo(model, x0, t, masked, am, torch.tensor([0, C, 1, C]))
    torch.testing.assert_close(clamped, given, rtol=1e-6, atol=1e-5)


def micro_batch(x0, am, t, masked, labels, slot_masked):
    """A MicroBatch whose uniforms give exactly these masks."""
    return train.MicroBatch(0, x0, am, t, (~masked).float(), labels, (~slot_masked).float())


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_at_disc_weight_zero_a_step_is_the_generative_step_bit_for_bit():
    model = joint_fixture().train()
    x0, am, t, masked = draw(1)
    labels, slot_masked = torch.tensor([0, 1, C, 1]), torch.tensor([True, False, True, True])
    n_tokens = int(am.sum())
    loss, extra = train.step_backward(model, [micro_batch(x0, am, t, masked, labels, slot_masked)], n_tokens,
                                      disc_weight=0.0, step_labeled=3)
    assert extra == {}
    step = grads(model)
    model.zero_grad()
    torch.manual_seed(0)  # the micro-batch's dropout seed
    (diffusion.joint_nelbo(model, x0, t, masked, am, labels, slot_masked, weight=diffusion.train_weight(t)).sum()
     / n_tokens).backward()
    assert torch.equal(step, grads(model))
    model.zero_grad()  # and λ > 0 is another step
    loss_1, extra_1 = train.step_backward(model, [micro_batch(x0, am, t, masked, labels, slot_masked)], n_tokens,
                                          disc_weight=1.0, step_labeled=3)
    assert not torch.allclose(step, grads(model)) and float(extra_1["disc_loss"]) > 0


def test_the_discriminative_term_is_the_readouts_cross_entropy_on_the_clean_text():
    model = joint_fixture()
    model.config.dropout = 0.0
    for block in model.blocks:
        block.dropout = 0.0
    model.train()
    x0, am, t, masked = draw(2)
    labels, slot_masked = torch.tensor([1, 0, C, 1]), torch.tensor([True, True, False, False])
    loss, extra = train.step_backward(model, [micro_batch(x0, am, t, masked, labels, slot_masked)], int(am.sum()),
                                      disc_weight=10.0, step_labeled=3)
    disc = extra["disc_loss"]
    with torch.no_grad():
        readout = diffusion.label_posterior(model, x0, am)  # the slot masked, the text clean
    expected = -(readout[0, 1] + readout[1, 0] + readout[3, 1]) / 3  # the labeled rows only
    assert float(disc) == pytest.approx(float(expected), rel=1e-5)
    with torch.no_grad():  # the reported loss is the generative term alone, its masked tokens weighted alike
        generative = diffusion.joint_nelbo(model, x0, t, masked, am, labels, slot_masked,
                                           weight=diffusion.train_weight(t)).sum() / int(am.sum())
    assert float(loss) == pytest.approx(float(generative), rel=1e-5)


class WindowStub(torch.nn.Module):
    """A 'model' whose slot posterior for a window is fixed by the window's first token."""
    def __init__(self, table):
        super().__init__()
        self.config = argparse.Namespace(n_classes=2, model_length=4, time_conditioning=False, vocab_size=64)
        self.table, self.calls = table, []
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, attention_mask=None, output_mask=None, class_labels=None, targets=None, label_out=False):
        assert class_labels is None and label_out and not output_mask.any()  # slot masked, no text scored
        self.calls.append(x.clone())
        return torch.zeros(0), torch.log(torch.tensor([self.table[int(row[0])] for row in x]))


def test_windows_combine_by_summed_log_posteriors_less_the_priors():
    table = {1: [0.9, 0.1], 2: [0.4, 0.6], 3: [0.7, 0.3]}
    stub = WindowStub(table)
    prior = np.array([0.75, 0.25])
    # a text of 10 tokens is 3 windows of <= 4 (data.windows: 3, 3, 4 tokens) starting with tokens 1, 2, 3
    text = [1, 9, 9, 2, 9, 9, 3, 9, 9, 9]
    assert [w[0] for w in data.windows(text, 4)] == [1, 2, 3]
    got = scoring.score_posterior(stub, [text, [2, 9]], batch_size=8, device="cpu", log_prior=np.log(prior))
    assert sum(len(x) for x in stub.calls) == 4  # one slot per window: 3 for the long text, 1 for the short
    by_hand = np.array(table[1]) * np.array(table[2]) * np.array(table[3]) / prior ** 2
    np.testing.assert_allclose(np.exp(got[0]), by_hand / by_hand.sum(), rtol=1e-6)
    np.testing.assert_allclose(np.exp(got[1]), table[2], rtol=1e-6)  # one window: its own posterior
    np.testing.assert_allclose(np.exp(got).sum(1), 1.0, rtol=1e-12)


def test_the_hybrid_step_does_not_depend_on_how_its_texts_are_split_into_micro_batches():
    """The NELBO is per token of the whole step and the cross-entropy per labeled text of the whole
    step (not of each micro-batch): three splits of one step give one loss, one disc term, one gradient."""
    model = joint_fixture()
    model.config.dropout = 0.0
    for block in model.blocks:
        block.dropout = 0.0
    model.train()
    x0, am, t, masked = draw(3, B=4, L=12)
    labels, slot_masked = torch.tensor([0, C, 1, 1]), torch.tensor([True, True, False, True])
    results = []
    for split in ([[0, 1, 2, 3]], [[0], [1, 2, 3]], [[1], [0, 2, 3]]):  # 1/3, then 0/3 labeled in the first part
        model.zero_grad()
        parts = [micro_batch(x0[r], am[r], t[r], masked[r], labels[r], slot_masked[r]) for r in split]
        loss, extra = train.step_backward(model, parts, int(am.sum()), disc_weight=10.0, step_labeled=3)
        results.append((float(loss), float(extra["disc_loss"]), grads(model)))
    # float32 sums in another order differ by rounding (measured: 6e-6 of the gradient, one CPU); a
    # normaliser of the micro-batch instead of the step changes a term by a third or more
    scale = float(results[0][2].abs().max())
    for loss, disc, grad in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5) and disc == pytest.approx(results[0][1], rel=1e-5)
        torch.testing.assert_close(grad, results[0][2], atol=1e-4 * scale, rtol=1e-3)
