"""Ancestral sampling (sample.ddpm / ddpm_cache) and the sample.py CLI, on the tiny fixture model."""
import json

import pytest
import torch

from conftest import FIXTURE, run_script
from convert_hf import load_hf, save_checkpoint
from model import DiT, DiTConfig
from sample import ddpm, ddpm_cache

MASK = 63  # fixture: vocab_size 64, model_length 32
SAMPLERS = [ddpm, ddpm_cache]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def model():
    return load_hf(str(FIXTURE))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def all_masked(batch, length):
    return torch.full((batch, length), MASK, dtype=torch.long)


def subs_probs(model, xt):
    """p_theta(x0 | x_t) at every position, written out here: softmax over the 63 real tokens. float64 [B, L, 63]."""
    with torch.no_grad():
        return model(xt, torch.zeros(len(xt)))[..., :MASK].double().softmax(-1)


def assert_follows(samples, probs, what):
    """Chi-square goodness of fit of integer samples [N] to probs [K]; categories expected < 5 times are pooled."""
    n = len(samples)
    counts = torch.bincount(samples, minlength=len(probs)).double()
    big = probs * n >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([probs[big] * n, (probs[~big].sum() * n)[None]])
    observed, expected = observed[expected > 0], expected[expected > 0]
    stat, dof = float(((observed - expected) ** 2 / expected).sum()), len(expected) - 1
    assert stat < dof + 6 * (2 * dof) ** 0.5, f"{what}: chi-square {stat:.1f} with {dof} degrees of freedom"


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 3, 40])
def test_every_position_is_unmasked_after_the_last_step(model, sampler, steps):
    x0, calls = sampler(model, all_masked(3, 12), steps, gen(0))
    assert x0.shape == (3, 12)
    assert ((x0 >= 0) & (x0 < MASK)).all()  # a real token everywhere, never the mask id
    assert 1 <= calls <= steps


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_fixed_positions_never_change(model, sampler):
    xt = all_masked(4, 16)
    fixed = torch.zeros(4, 16, dtype=torch.bool)
    fixed[:, :5] = True             # a prompt
    fixed[1, 10:12] = True          # infill context, different per row
    fixed[3, -1] = True
    given = torch.randint(0, MASK, (4, 16), generator=gen(1))
    xt[fixed] = given[fixed]
    x0, _ = sampler(model, xt, 10, gen(2), fixed=fixed)
    assert torch.equal(x0[fixed], given[fixed])
    assert (x0[~fixed] != MASK).all()
    x0_derived, _ = sampler(model, xt, 10, gen(2))  # fixed=None: the non-mask positions of xt
    assert torch.equal(x0_derived, x0)


@pytest.mark.parametrize("steps,top_p,prompt", [(3, 1.0, 0), (25, 1.0, 4), (25, 0.8, 0), (200, 1.0, 2), (200, 0.5, 0)])
def test_cached_sampler_is_an_exact_shortcut(model, steps, top_p, prompt):
    for seed in range(3):
        xt = all_masked(2, 8)
        xt[:, :prompt] = torch.arange(prompt)
        g_plain, g_cache = gen(seed), gen(seed)
        x_plain, calls_plain = ddpm(model, xt, steps, g_plain, top_p)
        x_cache, calls_cache = ddpm_cache(model, xt, steps, g_cache, top_p)
        assert torch.equal(x_plain, x_cache)
        assert torch.equal(g_plain.get_state(), g_cache.get_state())  # the same random numbers were drawn
        assert calls_plain == steps
        n_masked = int((xt == MASK).sum())
        assert calls_cache <= min(steps, 1 + n_masked)  # one call at the start, then at most one per change
    if steps == 200:
        assert calls_cache < steps


def test_cache_saves_calls_with_many_steps(model):
    x0, calls = ddpm_cache(model, all_masked(1, 8), 200, gen(0))
    assert (x0 != MASK).all()
    assert calls <= 9  # 8 positions: the first call plus one after each step that unmasked something


def test_time_conditioned_model_is_called_every_step():
    torch.manual_seed(0)
    m = DiT(DiTConfig(vocab_size=64, model_length=16, hidden_dim=32, cond_dim=16, n_blocks=1, n_heads=2,
                      time_conditioning=True)).eval()
    x_plain, calls_plain = ddpm(m, all_masked(2, 8), 30, gen(0))
    x_cache, calls_cache = ddpm_cache(m, all_masked(2, 8), 30, gen(0))
    assert calls_plain == calls_cache == 30
    assert torch.equal(x_plain, x_cache)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_same_samples(model, sampler):
    a, _ = sampler(model, all_masked(3, 16), 20, gen(7), 0.9)
    b, _ = sampler(model, all_masked(3, 16), 20, gen(7), 0.9)
    c, _ = sampler(model, all_masked(3, 16), 20, gen(8), 0.9)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_ancestral_chain_has_the_right_law(model):
    """Two positions, T = 3 steps. Each position is unmasked at a step uniform over the T steps,
    independently ((t_i - t_{i+1}) / t_i times the chance t_i of still being masked = 1/T), so
    P(x0[0] = a) = (1/T + (1 - 1/T)/2) p(a | [M, M]) + (1 - 1/T)/2 sum_b p(b | [M, M]) p(a | [M, b]):
    the second term needs the model to be called again on the partly unmasked sequence."""
    T, n = 3, 6000
    p_mm = subs_probs(model, all_masked(1, 2))[0]                                       # [2, 63]
    b = torch.arange(MASK)
    p0_given_b = subs_probs(model, torch.stack([torch.full((MASK,), MASK), b], 1))[:, 0]  # [b, a]
    p1_given_a = subs_probs(model, torch.stack([b, torch.full((MASK,), MASK)], 1))[:, 1]  # [a, b]
    law0 = (1 / T + (1 - 1 / T) / 2) * p_mm[0] + (1 - 1 / T) / 2 * (p_mm[1][:, None] * p0_given_b).sum(0)
    law1 = (1 / T + (1 - 1 / T) / 2) * p_mm[1] + (1 - 1 / T) / 2 * (p_mm[0][:, None] * p1_given_a).sum(0)
    x0, _ = ddpm_cache(model, all_masked(n, 2), T, gen(0))
    assert_follows(x0[:, 0], law0, "position 0")
    assert_follows(x0[:, 1], law1, "position 1")


def test_top_p_keeps_the_nucleus(model):
    n, top_p = 4000, 0.5
    p = subs_probs(model, all_masked(1, 1))[0, 0]
    order = p.argsort(descending=True)
    size = int((p[order].cumsum(0) < top_p).sum()) + 1  # smallest top set with mass >= top_p
    nucleus = torch.zeros_like(p)
    nucleus[order[:size]] = p[order[:size]] / p[order[:size]].sum()
    x0, _ = ddpm(model, all_masked(n, 1), 2, gen(0), top_p=top_p)
    assert size > 1 and set(x0[:, 0].tolist()) == set(order[:size].tolist())
    assert_follows(x0[:, 0], nucleus, "nucleus")


def test_tiny_top_p_is_greedy(model):
    """One step from all masks unmasks everything at once; a tiny nucleus holds only the argmax."""
    xt = all_masked(2, 10)
    xt[1, :3] = torch.tensor([4, 5, 6])
    x0, _ = ddpm(model, xt, 1, gen(0), top_p=1e-6)
    greedy = subs_probs(model, xt).argmax(-1)
    assert torch.equal(x0[0], greedy[0])
    assert torch.equal(x0[1, 3:], greedy[1, 3:]) and x0[1, :3].tolist() == [4, 5, 6]


def test_bad_arguments_raise_clear_errors(model):
    xt = all_masked(1, 8)
    with pytest.raises(ValueError, match="steps"):
        ddpm(model, xt, 0)
    with pytest.raises(ValueError, match="top_p"):
        ddpm(model, xt, 4, top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        ddpm_cache(model, xt, 4, top_p=1.5)
    with pytest.raises(ValueError, match="model_length"):
        ddpm(model, all_masked(1, 33), 4)
    with pytest.raises(ValueError, match="fixed positions"):
        ddpm(model, xt, 4, fixed=torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask token"):
        ddpm(model, torch.zeros(1, 8, dtype=torch.long), 4, fixed=torch.zeros(1, 8, dtype=torch.bool))
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            ddpm(model, xt, 4)
    finally:
        model.eval()


# ---- sample.py ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    """A freshly initialised DiT with the GPT-2 vocabulary (its zero output layer gives uniform SUBS probabilities)."""
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    cfg = DiTConfig(vocab_size=50258, model_length=64, hidden_dim=32, cond_dim=16, n_blocks=1, n_heads=2)
    torch.manual_seed(0)
    save_checkpoint(DiT(cfg).state_dict(), cfg, folder)
    return folder


def run_cli(*args):
    return run_script("sample.py", *args)


def test_sample_cli_jsonl_prompt_and_cache(gpt2_ckpt):
    common = ["--ckpt", gpt2_ckpt, "--num-samples", 3, "--steps", 30, "--length", 12, "--seed", 5,
              "--prompt", "This movie was", "--jsonl", "--batch-size", 2]
    cached, plain = run_cli(*common, "--cache"), run_cli(*common, "--no-cache")
    assert cached.returncode == 0 and plain.returncode == 0, cached.stderr + plain.stderr
    rows = [json.loads(line) for line in cached.stdout.splitlines()]
    rows_plain = [json.loads(line) for line in plain.stdout.splitlines()]
    assert len(rows) == 3
    for r, r_plain in zip(rows, rows_plain):
        assert r["text"].startswith("This movie was")
        assert r["tokens"][:3] == [1212, 3807, 373] and len(r["tokens"]) == 12  # GPT-2 ids of the prompt
        assert all(0 <= i < 50257 for i in r["tokens"])                           # never the mask id 50257
        assert r["steps"] == 30 and r["model_calls"] <= 1 + 2 * 9                 # 2 samples x 9 free positions
        assert r_plain["model_calls"] == 30 and r_plain["tokens"] == r["tokens"]


def test_sample_cli_text_file_and_errors(gpt2_ckpt, tmp_path):
    out = tmp_path / "samples.txt"
    ok = run_cli("--ckpt", gpt2_ckpt, "--num-samples", 2, "--steps", 5, "--length", 16, "--out", out)
    assert ok.returncode == 0, ok.stderr
    assert out.read_text(encoding="utf-8").count("\n") == 2  # one line per sample
    bad = run_cli("--ckpt", gpt2_ckpt, "--length", 65)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == ["error: --length 65: must be between 1 and the model's model_length 64"]
