"""The NELBO Monte-Carlo estimate behind eval.py (scoring.score_texts) and the eval.py CLI."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

import diffusion
from conftest import FIXTURE, run_script
from diffusion import draw_seed
from convert_hf import load_hf, save_checkpoint
from model import DiT, DiTConfig
from scoring import score_texts

MASK = 63  # fixture: vocab_size 64
TEXTS = [[5, 17, 42, 8, 30, 61], [12, 0, 33, 7]]  # two lengths, so batches hold padding


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def model():
    return load_hf(str(FIXTURE))


def exact_nelbo(model, ids: list[int], nodes: int = 64, lo: float = diffusion.SAMPLING_EPS, eps: float = diffusion.EPS) -> float:
    """E_t[ w(t) E_mask[ sum over masked i of -log p_theta(x0_i | x_t) ] ], t ~ U[lo, 1], w(t) = 1/t.

    The inner expectation is a sum over all 2^L masks m with q(m | t) = mc^|m| (1 - mc)^(L - |m|),
    mc = (1 - eps) t; each mask's loss comes from one forward pass (softmax over the 63 real
    tokens). The outer integral is a polynomial in t, integrated by 64-point Gauss-Legendre.
    lo = eps = 0 gives the eps -> 0 limit that the count estimator targets (test_conditional.py).
    """
    L, x0 = len(ids), torch.tensor(ids)
    masks = torch.tensor(list(itertools.product([False, True], repeat=L)))
    with torch.no_grad():
        logits = model(torch.where(masks, MASK, x0), torch.zeros(len(masks)))
    log_p = logits[..., :MASK].double().log_softmax(-1).gather(-1, x0.expand(len(masks), L)[..., None])[..., 0]
    loss, k = (-log_p * masks).sum(1).numpy(), masks.sum(1).numpy()
    x, w = np.polynomial.legendre.leggauss(nodes)
    t = (1 - lo) / 2 * x + (1 + lo) / 2
    mc = (1 - eps) * t[:, None]
    inner = (mc ** k * (1 - mc) ** (L - k) * loss).sum(1)
    return float(((1 - lo) / 2 * w * inner / t).sum() / (1 - lo))


def estimates(model, k: int, copies: int, seed: int = 0) -> np.ndarray:
    """`copies` independent K-draw estimates (the time estimator, Eq. 11; the count estimator is
    tested in test_conditional.py) of each text of TEXTS: float64 [copies, len(TEXTS)].
    (score_texts gives every text index its own seed, so copies of a text get independent draws.)"""
    return score_texts([model], TEXTS * copies, k, seed, batch_size=256, device="cpu",
                       estimator="time")[:, 0].reshape(copies, len(TEXTS))


def test_exact_nelbo_upper_bounds_the_likelihood_of_a_one_token_text(model):
    """Sanity check of the reference value: for L = 1 the bound is tight up to the eps terms,
    E_t[(1/t) (1 - EPS) t] (-log p(x | [M])) = (1 - EPS) (-log p(x | [M]))."""
    with torch.no_grad():
        nll = -model(torch.tensor([[MASK]]), torch.zeros(1))[0, 0, :MASK].double().log_softmax(-1)[9].item()
    assert exact_nelbo(model, [9]) == pytest.approx((1 - diffusion.EPS) * nll, rel=1e-6)  # float32 forward


def test_nelbo_estimate_is_unbiased(model):
    est = estimates(model, k=4, copies=1000)
    for j, ids in enumerate(TEXTS):
        exact = exact_nelbo(model, ids)
        se = est[:, j].std(ddof=1) / math.sqrt(len(est))
        assert abs(est[:, j].mean() - exact) < 4 * se, f"text {j}: MC mean {est[:, j].mean():.3f} vs exact {exact:.3f} (se {se:.3f})"
        assert se < 0.02 * exact  # sharp enough to see a bias of a few percent


def test_estimate_variance_shrinks_with_more_draws(model):
    sd = {k: estimates(model, k, copies=600, seed=1).std(0, ddof=1) for k in (2, 32)}
    # 16x the draws: the spread should shrink about 4x; the weight 1/t makes the draws heavy-tailed, so
    # the measured ratio ranges ~2.5-7 over seeds (600 copies); draws that were not independent would give ~1
    assert (sd[32] < sd[2] / 2).all(), sd


def draws_alone(model, ids: list[int], k: int, seed: int) -> float:
    """The K-draw NELBO of one sequence scored on its own, with the draws of `seed` (no batching, no padding)."""
    t, masked = diffusion.per_text_draws([len(ids)], k, [seed])
    x0 = torch.tensor([ids]).repeat(k, 1)
    with torch.no_grad():
        return float(diffusion.nelbo(model, x0, t, masked).double().mean())


def test_long_text_scores_as_the_sum_of_its_windows_and_short_texts_are_unaffected(model):
    L, k, seed = model.config.model_length, 3, 5
    g = torch.Generator().manual_seed(0)
    long = torch.randint(0, MASK, (3 * L,), generator=g).tolist()
    texts = [TEXTS[0], long, TEXTS[1]]
    got = score_texts([model], texts, k, seed, batch_size=6, device="cpu", estimator="time")[:, 0]
    # windows of the long text (text 1): tokens [0, L), [L, 2L), [2L, 3L), window w with the draws of draw_seed(seed, 1, w, 0)
    windows = [draws_alone(model, long[w * L:(w + 1) * L], k, draw_seed(seed, 1, w, 0)) for w in range(3)]
    assert got[1] == pytest.approx(sum(windows), rel=1e-5)
    for i in (0, 2):
        assert got[i] == pytest.approx(draws_alone(model, texts[i], k, draw_seed(seed, i, 0, 0)), rel=1e-5)
    # every window has draws of its own (torch keeps only 32 bits of a seed: offsets above them once made them equal)
    masks = [diffusion.per_text_draws([L], k, [draw_seed(seed, 1, w, 0)])[1] for w in range(3)]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


# ---- eval.py ------------------------------------------------------------------------------
REVIEWS = {"neg": ["Terrible film. I walked out after twenty minutes and asked for my money back.",
                   "Boring, slow and far too long.<br />The plot makes no sense and the acting is wooden.",
                   "The worst movie I have seen this year; even the music is annoying."],
           "pos": ["A wonderful, moving story with a brilliant cast. I cried at the end.",
                   "Great acting, a clever plot and beautiful photography.<br />Highly recommended!",
                   "I loved every minute of it and will happily watch it again with friends."]}
CFG = DiTConfig(vocab_size=50258, model_length=64, hidden_dim=32, cond_dim=16, n_blocks=1, n_heads=2)
GPT2 = 50257


def gpt2_ids(text: str) -> list[int]:
    import tiktoken
    return tiktoken.get_encoding("gpt2").encode_ordinary(text.replace("<br />", "\n"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An aclImdb-shaped folder and two fresh tiny checkpoints. A fresh DiT's output layer has zero
    weights, so its SUBS distribution is softmax(output bias) at every position, whatever the
    context: 'uniform' keeps the zero bias; 'pos' raises the bias of every token of the positive reviews."""
    root = tmp_path_factory.mktemp("eval")
    for split in ("train", "test"):
        for label, texts in REVIEWS.items():
            folder = root / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for i, text in enumerate(texts):
                (folder / f"{i}_{2 if label == 'neg' else 9}.txt").write_text(text, encoding="utf-8")
    torch.manual_seed(0)
    model = DiT(CFG)
    save_checkpoint(model.state_dict(), CFG, root / "uniform", {"class_name": "uniform"})
    pos_ids = sorted({i for text in REVIEWS["pos"] for i in gpt2_ids(text)})
    with torch.no_grad():
        model.output_layer.linear.bias[pos_ids] = 6.0
    save_checkpoint(model.state_dict(), CFG, root / "pos", {"class_name": "pos"})
    return root, model.output_layer.linear.bias.detach().double()


def run_cli(*args):
    return run_script("eval.py", *args)


def test_eval_cli_confusion_of_likelihoods(workdir):
    root, pos_bias = workdir
    out = root / "ppl.json"
    res = run_cli("--ckpt", root / "uniform", "--ckpt", root / "pos", "--data", root / "aclImdb", "--split", "test",
                  "--mc-samples", 16, "--seed", 0, "--json", out)
    assert res.returncode == 0, res.stderr
    summary = json.loads(out.read_text())
    table = {(r["data"], r["name"]): r for r in summary["results"]}
    assert sorted(table) == [("neg", "pos"), ("neg", "uniform"), ("pos", "pos"), ("pos", "uniform")]
    # expected bound: with a context-free model, E[NELBO] = (1 - EPS) * sum_i -log p(x_i) exactly
    log_p = {"uniform": torch.full((GPT2,), -math.log(GPT2), dtype=torch.float64),
             "pos": pos_bias[:GPT2].log_softmax(0)}
    for (label, name), r in table.items():
        ids = [i for text in REVIEWS[label] for i in gpt2_ids(text)]
        assert r["n_texts"] == 3 and r["n_tokens"] == len(ids)
        expected = (1 - diffusion.EPS) * float(-log_p[name][ids].mean())
        assert abs(r["nats_per_token"] - expected) < 1.5, (label, name, r["nats_per_token"], expected)
    # the positive-review model explains positive reviews far better than negative ones
    assert table[("pos", "pos")]["nats_per_token"] < table[("neg", "pos")]["nats_per_token"] - 2
    assert "uniform" in res.stdout and "neg" in res.stdout


def test_eval_cli_on_a_text_file_and_bad_input(workdir, tmp_path):
    root, _ = workdir
    texts = tmp_path / "texts.txt"
    texts.write_text("A fine little film.\n\nNot my cup of tea at all.\n", encoding="utf-8")
    out = tmp_path / "ppl.json"
    res = run_cli("--ckpt", root / "uniform", "--input", texts, "--mc-samples", 2, "--json", out)
    assert res.returncode == 0, res.stderr
    (r,) = json.loads(out.read_text())["results"]
    assert r["data"] == "input" and r["n_texts"] == 2
    assert r["n_tokens"] == len(gpt2_ids("A fine little film.")) + len(gpt2_ids("Not my cup of tea at all."))
    bad = run_cli("--ckpt", FIXTURE, "--input", texts, "--mc-samples", 2)  # vocab_size 64: no room for GPT-2 ids
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ") and "vocab_size 64" in bad.stderr


def test_eval_cli_by_t_beside_the_counts_models(workdir, tmp_path):
    from collections import Counter
    root, _ = workdir
    out = tmp_path / "by_t.json"
    res = run_cli("--ckpt", root / "uniform", "--data", root / "aclImdb", "--mc-samples", 2, "--by-t", "--json", out)
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    # a context-free model with a zero head: every masked token costs log(50257), at every t
    assert [r["t"] for r in doc["by_t"]] == [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99]
    for r in doc["by_t"]:
        assert r["masked_tokens"] > 0 and r["nats_per_masked_token"] == pytest.approx(math.log(GPT2), abs=1e-4), r
    # the unigram reference by hand: these 6 train reviews are the test reviews (5 % of 3 rounds to no validation)
    ids = [i for texts in REVIEWS.values() for text in texts for i in gpt2_ids(text)]
    counts = Counter(ids)
    unigram = -np.mean([math.log((counts[i] + 0.5) / (len(ids) + 0.5 * GPT2)) for i in ids])
    assert doc["reference"]["unigram"] == pytest.approx(unigram)
    assert doc["reference"]["bigram"] < unigram  # the same texts: their bigrams were all seen
    assert "unigram" in res.stdout and "bits/token" in res.stdout


def test_by_t_says_n_a_where_a_masking_rate_masked_no_token(workdir, tmp_path):
    """Two one-token texts: at t = 0.05 seed 0's draws mask neither, and there is no cross-entropy to
    report there: n/a in the table and null in the JSON, not 0."""
    root, _ = workdir
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "great", "label": "pos"}\n{"text": "bad", "label": "neg"}\n', encoding="utf-8")
    assert [len(gpt2_ids(t)) for t in ("great", "bad")] == [1, 1]
    out = tmp_path / "by_t.json"
    res = run_cli("--ckpt", root / "uniform", "--test-data", short, "--data", root / "aclImdb", "--mc-samples", 1,
                  "--by-t", "--json", out)
    assert res.returncode == 0, res.stderr
    rows = {r["t"]: r for r in json.loads(out.read_text())["by_t"]}
    assert rows[0.05]["masked_tokens"] == 0 and rows[0.05]["nats_per_masked_token"] is None
    assert rows[0.99]["masked_tokens"] == 2
    assert rows[0.99]["nats_per_masked_token"] == pytest.approx(math.log(GPT2), abs=1e-4)  # a zero head: log V
    table = {line.split()[0]: line.split()[1:] for line in res.stdout.splitlines() if line.strip()}
    assert table["0.05"] == ["n/a"] and table["0.99"] == [f"{math.log(GPT2):.4f}"]
