"""model.DiT: padding is never attended to; the masked-position output path equals the full one."""
import pytest
import torch

import diffusion
from model import DiT, DiTConfig, set_runtime

CFG = DiTConfig(vocab_size=64, model_length=32, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4, time_conditioning=True)
LENGTHS = [32, 20, 7]


def random_model(seed=0):
    torch.manual_seed(seed)
    model = DiT(CFG).eval()
    with torch.no_grad():  # adaLN-Zero init makes every block the identity: randomise so the test can fail
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 63, (len(LENGTHS), max(LENGTHS)), generator=g)
    attention_mask = torch.arange(max(LENGTHS))[None] < torch.tensor(LENGTHS)[:, None]
    x[~attention_mask] = 5  # padding content must not matter
    return x, attention_mask


@torch.no_grad()
def test_padded_batch_equals_each_sequence_alone(batch):
    model = random_model()
    x, attention_mask = batch
    sigma = torch.tensor([0.3, 1.0, 2.0])
    padded = model(x, sigma, attention_mask)
    for i, n in enumerate(LENGTHS):
        alone = model(x[i:i + 1, :n], sigma[i:i + 1])
        torch.testing.assert_close(padded[i, :n], alone[0], atol=1e-5, rtol=0)
    # and the mask matters: without it, the padded rows see the padding
    assert not torch.allclose(model(x, sigma)[2, :7], padded[2, :7], atol=1e-3)


@torch.no_grad()
def test_output_mask_selects_the_same_logits(batch):
    model = random_model()
    x, attention_mask = batch
    sigma = torch.zeros(3)
    select = attention_mask & (torch.rand(attention_mask.shape, generator=torch.Generator().manual_seed(2)) < 0.5)
    torch.testing.assert_close(model(x, sigma, attention_mask, output_mask=select), model(x, sigma, attention_mask)[select])


@torch.no_grad()
@pytest.mark.parametrize("inference", [False, True])
def test_layer_norms_run_in_fp32_under_bf16_autocast(batch, inference):
    """The reference computes LayerNorm in fp32. nn.LayerNorm does so under CUDA autocast, but under CPU
    autocast it keeps its input's dtype: the model must feed it the fp32 residual stream."""
    model = set_runtime(random_model(), "bf16", inference)
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    x, attention_mask = batch
    model(x, torch.zeros(3), attention_mask)
    assert len(seen) == 2 * CFG.n_blocks + 1 and set(seen) == {(torch.float32, torch.float32)}


@torch.no_grad()
def test_nelbo_of_a_sequence_does_not_depend_on_its_batch(batch):
    model = random_model()
    x, attention_mask = batch
    t = torch.tensor([0.2, 0.5, 0.9])
    masked = diffusion.mask_positions(t, attention_mask, torch.Generator().manual_seed(3))
    together = diffusion.nelbo(model, x, t, masked, attention_mask)
    for i, n in enumerate(LENGTHS):
        alone = diffusion.nelbo(model, x[i:i + 1, :n], t[i:i + 1], masked[i:i + 1, :n])
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-4, rtol=1e-6)
    # padding tokens hold any value: changing them changes nothing
    x2 = x.clone()
    x2[~attention_mask] = 17
    torch.testing.assert_close(diffusion.nelbo(model, x2, t, masked, attention_mask), together)


def test_time_conditioning_false_gives_the_model_sigma_zero():
    model = DiT(DiTConfig(vocab_size=64, model_length=8, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2))
    assert torch.equal(diffusion.model_sigma(model, torch.tensor([0.5, 0.9])), torch.zeros(2))
    model.config.time_conditioning = True
    assert torch.all(diffusion.model_sigma(model, torch.tensor([0.5, 0.9])) > 0)


def test_bad_head_count_is_refused():
    with pytest.raises(ValueError, match="n_heads"):
        DiT(DiTConfig(hidden_dim=30, n_heads=4))
