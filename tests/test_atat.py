"""atat: MDLM-ATAT's adaptive masking keeps the expected masking rate, reduces to plain MDLM at tilt 0,
follows the curriculum, its importance weights keep each token's expected term, and the estimator learns."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import atat
from diffusion import antithetic_t, move_chance, train_weight

TILTS = [-1.0, -0.5, 0.5, 1.0]


def random_batch(seed: int, B: int = 6, L: int = 40):
    """t float32 [B], scores [B, L] with a different distribution per row (padding scores set to 1.0,
    a legal but extreme value), attention_mask with random lengths (one row of length 1, one full)."""
    g = torch.Generator().manual_seed(seed)
    t = antithetic_t(B, g)
    offset = torch.randn(B, 1, generator=g) * 2
    spread = torch.rand(B, 1, generator=g) * 3
    scores = torch.sigmoid(offset + spread * torch.randn(B, L, generator=g))
    lengths = torch.randint(2, L + 1, (B,), generator=g)
    lengths[0], lengths[1] = 1, L
    attention_mask = torch.arange(L)[None] < lengths[:, None]
    scores = torch.where(attention_mask, scores, 1.0)
    return t, scores, attention_mask


# ---- (i) the tilted probabilities: a valid distribution with the plain rate on average --------
@pytest.mark.parametrize("tilt", TILTS)
def test_tilted_rate_averages_to_move_chance_per_row(tilt):
    for seed in range(3):
        t, scores, attention_mask = random_batch(seed)
        p = atat.tilted_move_chance(t, scores, attention_mask, tilt)
        assert p.dtype == torch.float32 and p.shape == scores.shape
        assert torch.all(p >= 0) and torch.all(p <= 1)
        assert torch.all(p[~attention_mask] == 0)
        m = move_chance(t).double()
        n = attention_mask.sum(1)
        row_mean = torch.where(attention_mask, p.double(), 0.0).sum(1) / n
        torch.testing.assert_close(row_mean, m, atol=1e-6, rtol=0)
        # the tilt does act, in its own direction: p moves with (tilt > 0) or against the score
        for b in range(2, len(t)):
            real = attention_mask[b]
            s, pb = scores[b, real].double(), p[b, real].double()
            assert pb.std() > 0
            assert torch.sign(((s - s.mean()) * (pb - pb.mean())).sum()) == math.copysign(1, tilt)
            # the importance weight stays bounded: p >= (1 - |tilt|) m
            assert torch.all(pb >= (1 - abs(tilt)) * m[b] - 1e-6)


def test_padding_scores_are_never_read():
    t, scores, attention_mask = random_batch(5)
    p = atat.tilted_move_chance(t, scores, attention_mask, 0.7)
    garbage = torch.where(attention_mask, scores, float("nan"))
    assert torch.equal(atat.tilted_move_chance(t, garbage, attention_mask, 0.7), p)


def test_a_row_of_equal_scores_gets_move_chance():
    # 0.1 is not a float32 dyadic: the row's float mean need not equal its entries exactly
    t = torch.tensor([0.3, 0.8])
    scores = torch.full((2, 7), 0.1)
    scores[1, 5:] = 0.9  # padding of row 1
    attention_mask = torch.ones(2, 7, dtype=torch.bool)
    attention_mask[1, 5:] = False
    p = atat.tilted_move_chance(t, scores, attention_mask, 1.0)
    m = move_chance(t)
    assert torch.equal(p[0], m[0].expand(7))
    assert torch.equal(p[1, :5], m[1].expand(5))


def test_masking_carries_no_gradient_to_the_scores():
    t, scores, attention_mask = random_batch(1)
    scores.requires_grad_(True)
    masked, p = atat.mask_with_scores(t, scores, attention_mask, 0.5, torch.rand(scores.shape))
    assert not p.requires_grad


def test_bad_tilt_and_shapes_raise():
    t, scores, attention_mask = random_batch(2)
    with pytest.raises(ValueError, match="tilt"):
        atat.tilted_move_chance(t, scores, attention_mask, 1.5)
    with pytest.raises(ValueError, match="shape|expected"):
        atat.tilted_move_chance(t[:3], scores, attention_mask, 0.5)
    with pytest.raises(ValueError, match="u must"):
        atat.mask_with_scores(t, scores, attention_mask, 0.5, torch.rand(2, 3))


# ---- (ii) tilt 0 is plain MDLM, bit for bit ---------------------------------------------------
def test_tilt_zero_is_the_plain_objective_bit_for_bit():
    for seed in range(4):
        t, scores, attention_mask = random_batch(seed, B=8, L=64)
        g = torch.Generator().manual_seed(100 + seed)
        u = torch.rand(attention_mask.shape, generator=g)
        plain = (u < move_chance(t)[:, None]) & attention_mask
        masked, p = atat.mask_with_scores(t, scores, attention_mask, 0.0, u)
        assert torch.equal(masked, plain)
        assert torch.equal(p, torch.where(attention_mask, move_chance(t)[:, None].expand_as(p), 0.0))
        w = atat.token_weights(t, p)
        expected = torch.where(attention_mask, train_weight(t)[:, None].float().expand_as(w), 0.0)
        assert torch.equal(w, expected)


def test_tilt_zero_is_exact_over_a_fine_grid_of_t():
    # 1-ulp differences (e.g. (1 - eps) t for move_chance(t), or (train_weight * m) / p for train_weight * (m / p))
    # show up only at some t: check a fine grid of them
    g = torch.Generator().manual_seed(0)
    t = antithetic_t(300_000, g)
    scores = torch.rand(len(t), 2, generator=g)
    attention_mask = torch.ones(len(t), 2, dtype=torch.bool)
    u = torch.rand(len(t), 2, generator=g)
    masked, p = atat.mask_with_scores(t, scores, attention_mask, 0.0, u)
    assert torch.equal(p, move_chance(t)[:, None].expand_as(p))
    assert torch.equal(masked, u < move_chance(t)[:, None])
    assert torch.equal(atat.token_weights(t, p), train_weight(t)[:, None].expand_as(p))


# ---- (iii) the curriculum: easy tokens first, hard tokens last ---------------------------------
def test_curriculum_masks_easy_tokens_first_and_hard_tokens_last():
    g = torch.Generator().manual_seed(0)
    L, N, max_steps = 60, 3000, 100
    low = torch.arange(L) < L // 2
    row = torch.where(low, 0.1, 0.9) + 0.05 * torch.rand(L, generator=g)  # low half: easy, high half: hard
    scores = row.expand(N, L)
    attention_mask = torch.ones(N, L, dtype=torch.bool)
    t = torch.full((N,), 0.4)
    m = float(move_chance(t[:1]))
    se = math.sqrt(m * (1 - m) / (N * L // 2))  # a bound on the standard error of a half's rate (Bernoulli variance <= m(1-m))
    for step, easy_first in ((0, True), (max_steps - 1, False)):
        tilt = atat.curriculum_tilt(step, max_steps)
        u = torch.rand(N, L, generator=g)
        masked, p = atat.mask_with_scores(t, scores, attention_mask, tilt, u)
        p_low, p_high = p[0, low], p[0, ~low]
        rate_low, rate_high = masked[:, low].float().mean().item(), masked[:, ~low].float().mean().item()
        if easy_first:
            assert p_low.min() > p_high.max()
            assert rate_low > rate_high + 8 * se
        else:
            assert p_high.min() > p_low.max()
            assert rate_high > rate_low + 8 * se
        overall = masked.float().mean().item()
        assert abs(overall - m) < 4 * se / math.sqrt(2)


# ---- (iv) the tilt schedule ------------------------------------------------------------------
def test_curriculum_tilt_schedule():
    T = 1000
    assert atat.curriculum_tilt(0, T) == -0.5
    assert atat.curriculum_tilt(299, T) == -0.5
    assert atat.curriculum_tilt(300, T) == -0.5  # the ramp starts at -strength
    assert atat.curriculum_tilt(500, T) == pytest.approx(0.0, abs=1e-12)
    assert atat.curriculum_tilt(400, T) == pytest.approx(-0.25, abs=1e-12)
    assert atat.curriculum_tilt(700, T) == 0.5
    assert atat.curriculum_tilt(T - 1, T) == 0.5
    assert atat.curriculum_tilt(T, T) == 0.5
    assert atat.curriculum_tilt(0, T, (0.0, 1.0), 1.0) == -1.0
    assert atat.curriculum_tilt(10, 100, (0.5, 0.5), 0.2) == -0.2  # an empty middle phase: a step
    assert atat.curriculum_tilt(50, 100, (0.5, 0.5), 0.2) == 0.2
    values = [atat.curriculum_tilt(s, T, (0.2, 0.9), 0.8) for s in range(T)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert min(values) == -0.8 and max(values) == 0.8


@pytest.mark.parametrize("kwargs, name", [
    (dict(phases=(0.7, 0.3)), "phases"), (dict(phases=(-0.1, 0.5)), "phases"), (dict(phases=(0.3, 1.2)), "phases"),
    (dict(strength=1.5), "strength"), (dict(strength=-0.1), "strength"), (dict(max_steps=0), "max_steps"),
    (dict(step=-1), "step")])
def test_curriculum_tilt_rejects_bad_arguments(kwargs, name):
    args = dict(step=0, max_steps=100) | kwargs
    with pytest.raises(ValueError, match=name) as info:
        atat.curriculum_tilt(**args)
    assert "\n" not in str(info.value)


# ---- (v) the estimator -----------------------------------------------------------------------
def toy_batch(g, B=32, L=16, hard=7):
    """ids 0..20, random lengths; difficulty target 1.0 at id `hard`, 0.05 elsewhere, at masked positions."""
    x0 = torch.randint(0, 21, (B, L), generator=g)
    attention_mask = torch.arange(L)[None] < torch.randint(L // 2, L + 1, (B, 1), generator=g)
    masked = (torch.rand(B, L, generator=g) < 0.5) & attention_mask
    nll = torch.where(x0 == hard, 1.0, 0.05) * math.log(31)  # nats; vocab 32 = 31 real tokens + mask
    return x0, attention_mask, masked, torch.where(masked, nll, 0.0)


def mean_score_per_id(est, x0, attention_mask):
    with torch.no_grad():
        s = est(x0, attention_mask)
    return torch.stack([s[(x0 == i) & attention_mask].mean() for i in range(21)])


def test_estimator_learns_to_rank_a_planted_hard_token_first(one_thread):
    torch.manual_seed(0)
    est = atat.ImportanceEstimator(atat.EstimatorConfig(vocab_size=32, width=32, layers=1, heads=4, max_length=16))
    g = torch.Generator().manual_seed(0)
    x_eval, am_eval, _, _ = toy_batch(torch.Generator().manual_seed(1), B=64)
    before = mean_score_per_id(est, x_eval, am_eval)
    margin_before = (before[7] - torch.cat([before[:7], before[8:]]).max()).item()
    opt = torch.optim.Adam(est.parameters(), lr=3e-3)
    for _ in range(100):
        x0, attention_mask, masked, nll = toy_batch(g)
        target = atat.difficulty_target(nll, 32)
        loss = atat.estimator_loss(est(x0, attention_mask), target, masked)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mean_score_per_id(est, x_eval, am_eval)
    margin_after = (after[7] - torch.cat([after[:7], after[8:]]).max()).item()
    assert margin_after > 0.3  # measured 0.88-0.91 over seeds 0-7 (before: -0.36 to -0.02)
    assert margin_after > margin_before + 0.3


def test_estimator_output_and_padding():
    torch.manual_seed(0)
    est = atat.ImportanceEstimator(atat.EstimatorConfig(vocab_size=32, width=32, layers=2, heads=4, max_length=16))
    g = torch.Generator().manual_seed(0)
    x0, attention_mask, _, _ = toy_batch(g, B=4)
    attention_mask[0] = False  # a row with no real token: no NaN
    s = est(x0, attention_mask)
    assert s.dtype == torch.float32 and s.shape == x0.shape
    assert torch.all((s > 0) & (s < 1))
    # padding keys are hidden: other ids at padding leave the real tokens' scores unchanged
    x1 = torch.where(attention_mask, x0, torch.randint(0, 32, x0.shape, generator=g))
    assert not torch.equal(x0, x1)
    torch.testing.assert_close(est(x1, attention_mask)[attention_mask], s[attention_mask])
    assert est(x0).shape == x0.shape  # attention_mask None: all real
    est.eval()
    with torch.no_grad():  # torch's inference fast path: an all-padding row would give NaN there
        s_eval = est(x0, attention_mask)
    assert torch.all((s_eval > 0) & (s_eval < 1))
    torch.testing.assert_close(s_eval[attention_mask], s[attention_mask].detach(), atol=1e-5, rtol=1e-4)


# ---- (vii) too long -----------------------------------------------------------------------------
def test_estimator_rejects_too_long_input_and_bad_config():
    est = atat.ImportanceEstimator(atat.EstimatorConfig(vocab_size=32, width=32, layers=1, heads=4, max_length=16))
    with pytest.raises(ValueError, match="max_length") as info:
        est(torch.zeros(2, 17, dtype=torch.long))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="heads"):
        atat.EstimatorConfig(vocab_size=32, width=30, heads=4)


def test_difficulty_target():
    V = 32
    nll = torch.tensor([[0.0, 0.5 * math.log(V - 1), math.log(V - 1), 3 * math.log(V - 1)]], requires_grad=True)
    target = atat.difficulty_target(nll, V)
    assert not target.requires_grad and target.dtype == torch.float32
    torch.testing.assert_close(target, torch.tensor([[0.0, 0.5, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="vocab_size"):
        atat.difficulty_target(nll, 2)


def test_estimator_loss_reads_only_masked_positions():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 8, generator=g)
    target = torch.rand(3, 8, generator=g)
    masked = torch.rand(3, 8, generator=g) < 0.5
    expected = ((scores - target) ** 2)[masked].mean()
    garbage = torch.where(masked, scores, float("nan")).requires_grad_(True)  # NaN where unmasked
    loss = atat.estimator_loss(garbage, target, masked)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(garbage.grad).all()
    nothing = torch.zeros_like(masked)
    empty = atat.estimator_loss(garbage, target, nothing)
    assert empty.item() == 0
    garbage.grad = None
    empty.backward()
    assert torch.equal(garbage.grad, torch.zeros_like(garbage))


# ---- (vi) importance weights ----------------------------------------------------------------------
def test_token_weights_are_finite_and_zero_where_never_masked():
    t, scores, attention_mask = random_batch(3)
    for tilt in TILTS:
        p = atat.tilted_move_chance(t, scores, attention_mask, tilt)
        w = atat.token_weights(t, p)
        assert torch.isfinite(w).all() and torch.all(w[p == 0] == 0) and torch.all(w[~attention_mask] == 0)
        if abs(tilt) < 1:  # bounded by train_weight / (1 - |tilt|)
            assert torch.all(w <= train_weight(t)[:, None] / (1 - abs(tilt)) * (1 + 1e-5))
    # tilt 1 at m <= 1/2: the token farthest below the mean is never masked (p = 0), and weighs 0
    t = torch.tensor([0.3])
    p = atat.tilted_move_chance(t, torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.5]]), torch.tensor([[True] * 4 + [False]]), 1.0)
    assert p[0, 0] == 0 and p[0, 4] == 0 and torch.all(p[0, 1:4] > 0)
    assert torch.equal(atat.token_weights(t, p)[0, [0, 4]], torch.zeros(2))


@pytest.mark.parametrize("tilt", [-0.8, 0.8])
def test_weighted_loss_keeps_each_tokens_plain_expectation(tilt):
    # a per-token "nll" that does not depend on the context, correlated with the score:
    # E[sum_i 1{masked_i} w_i nll_i] must equal the plain E = train_weight(t) m sum_i nll_i
    g = torch.Generator().manual_seed(0)
    B, L, N = 4, 30, 4000
    t = torch.tensor([0.2, 0.5, 0.7, 0.95])
    scores = torch.rand(B, L, generator=g)
    attention_mask = torch.arange(L)[None] < torch.tensor([[30], [25], [12], [20]])
    nll = torch.where(attention_mask, 0.5 + 3 * scores, 0.0)
    u = torch.rand(N, B, L, generator=g).reshape(N * B, L)
    rep = lambda x: x.repeat(N, *([1] * (x.dim() - 1)))  # row n*B + b is draw n of row b
    masked, p = atat.mask_with_scores(rep(t), rep(scores), rep(attention_mask), tilt, u)
    w = atat.token_weights(rep(t), p)
    draws = (masked * w * rep(nll)).sum(1).double().reshape(N, B)
    estimate, se = draws.mean(0), draws.std(0) / math.sqrt(N)
    expected = (train_weight(t) * move_chance(t)).double() * nll.double().sum(1)
    assert torch.all((estimate - expected).abs() < 4 * se), (estimate, expected, se)
    # the unweighted tilted loss is biased here (what the weights are for): the check can tell
    unweighted = (masked * train_weight(rep(t))[:, None] * rep(nll)).sum(1).double().reshape(N, B).mean(0)
    assert ((unweighted - expected).abs() > 8 * se).any()


# ---- train.py --objective atat ---------------------------------------------------------------
def atat_train_args(tree, out, *extra):
    return ["--class", "1", "--data", str(tree), "--init", "scratch", "--preset", "tiny", "--max-steps", "6",
            "--warmup-steps", "2", "--batch-size", "4", "--eval-every", "3", "--val-reviews", "2", "--lr-schedule", "cosine",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def imdb(tmp_path_factory):
    from conftest import make_imdb_tree
    return make_imdb_tree(tmp_path_factory.mktemp("atat") / "imdb")


def run_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_atat_at_tilt_0_and_estimator_weight_0_is_the_plain_step_bit_for_bit(imdb, tmp_path, one_thread):
    import train
    train.main(atat_train_args(imdb, tmp_path / "plain"))
    train.main(atat_train_args(imdb, tmp_path / "atat", "--objective", "atat", "--atat-tilt", "0", "--atat-estimator-weight", "0"))
    plain, tilted = run_log(tmp_path / "plain"), run_log(tmp_path / "atat")
    assert [(r.get("loss"), r.get("grad_norm"), r.get("val_nats_per_token")) for r in plain] == \
        [(r.get("loss"), r.get("grad_norm"), r.get("val_nats_per_token")) for r in tilted]
    a, b = (load_file(tmp_path / run / "train_state.safetensors") for run in ("plain", "atat"))
    assert all(torch.equal(a[k], b[k]) for k in a) and any(k.startswith("estimator.") for k in b)
    # and with the defaults the run is a different one: the tilt follows the curriculum
    train.main(atat_train_args(imdb, tmp_path / "default", "--objective", "atat"))
    log = run_log(tmp_path / "default")[1:]
    assert [r["tilt"] for r in log][0] == -0.5 and log[-1]["tilt"] == 0.5 and all(r["estimator_loss"] > 0 for r in log)
    assert [r["loss"] for r in log] != [r["loss"] for r in plain[1:]]


def test_an_atat_checkpoint_resumes_exactly_and_loads_in_classify_and_eval(imdb, tmp_path, monkeypatch, one_thread):
    import shutil
    import train
    args = ("--objective", "atat")
    real_save, copies = train.save, tmp_path / "at_step_3"

    def save_and_keep_step_3(*a, **kw):  # the whole run, with a copy of its step-3 checkpoint
        real_save(*a, **kw)
        if a[4] == 3:
            shutil.copytree(tmp_path / "full", copies)
    monkeypatch.setattr(train, "save", save_and_keep_step_3)
    train.main(atat_train_args(imdb, tmp_path / "full", *args))
    monkeypatch.setattr(train, "save", real_save)
    train.main(atat_train_args(imdb, copies, *args, "--resume"))
    a, b = (load_file(out / "train_state.safetensors") for out in (tmp_path / "full", copies))
    assert a.keys() == b.keys() and any(k.startswith("estimator.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert [r.get("loss") for r in run_log(copies)] == [r.get("loss") for r in run_log(tmp_path / "full")]
    longer = atat_train_args(imdb, copies, *args, "--resume")
    longer[longer.index("--max-steps") + 1] = "8"
    with pytest.raises(SystemExit):  # the curriculum and the cosine lr are laid out over --max-steps: it must not change
        train.main(longer)
    # what classify.py and eval.py load holds the DiT alone: the estimator is not in model.safetensors
    from safetensors import safe_open
    with safe_open(tmp_path / "full" / "model.safetensors", "pt") as f:
        assert not any("estimator" in k for k in f.keys())
    from conftest import run_script
    neg = atat_train_args(imdb, tmp_path / "neg", *args)
    neg[neg.index("--class") + 1] = "0"
    train.main(neg)
    for script, extra in [("classify.py", ["--ckpt0", tmp_path / "neg", "--ckpt1", tmp_path / "full"]),
                          ("eval.py", ["--ckpt", tmp_path / "full"])]:
        result = run_script(script, *extra, "--data", imdb, "--limit", 4, "--mc-samples", 1)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


def test_a_non_finite_estimator_stops_training_before_the_update(imdb, tmp_path, monkeypatch, capsys, one_thread):
    """A NaN in the estimator alone (the DiT's loss stays finite) must not pass silently: NaN scores
    would read as equal scores, i.e. plain masking."""
    import train
    real = atat.estimator_loss
    monkeypatch.setattr(atat, "estimator_loss", lambda *args: real(*args) * float("nan"))
    with pytest.raises(SystemExit):
        train.main(atat_train_args(imdb, tmp_path / "o", "--objective", "atat"))
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: loss ") and ", estimator loss nan" in message
    assert "at step 1; stopped before the update" in message and not (tmp_path / "o" / "train_state.safetensors").exists()


def test_atat_is_refused_for_the_joint_model(capsys):
    """--class all trains the NELBO of (label, text) (diffusion.joint_nelbo); ATAT's tilt is a per-class-model option."""
    import train
    with pytest.raises(SystemExit):
        train.parse_args(["--class", "all", "--objective", "atat", "--out", "x"])
    assert "--objective: atat applies to one model per class" in capsys.readouterr().err
