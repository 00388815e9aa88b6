"""One joint MDLM over (label, text) for every class, the count NELBO estimator, the loss per real
token of a whole step, and calibrated posteriors (temperature scaling, ECE)."""
import argparse
import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import calibration
import classify
import data
import diffusion
import scoring
import train
from classify import DiffusionClassifier
from conftest import FIXTURE, LANGUAGES, make_languages, run_script
from test_eval import exact_nelbo
from convert_hf import CheckpointError, load_hf, save_checkpoint
from model import DiT, DiTConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread
MASK = 63  # fixture: vocab_size 64


# ---- the label slot's tensors ----------------------------------------------------------------------
def test_the_label_slot_is_required_exactly_when_the_config_has_classes(tmp_path):
    cfg = DiTConfig(vocab_size=64, model_length=16, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2, n_classes=2)
    model = DiT(cfg)
    save_checkpoint(model.state_dict(), cfg, tmp_path / "cond")
    assert load_hf(str(tmp_path / "cond")).config.n_classes == 2  # round trip
    tensors = load_file(tmp_path / "cond" / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "label_embed" not in k}, tmp_path / "cond" / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing: backbone.label_embed.weight"):
        load_hf(str(tmp_path / "cond"))
    plain = DiT(DiTConfig(vocab_size=64, model_length=16, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2))
    save_checkpoint({**plain.state_dict(), "label_embed.weight": torch.zeros(3, 16)}, plain.config, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    config.pop("n_classes")  # a Hugging Face config has no n_classes: it means 0
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unexpected: backbone.label_embed.weight"):
        load_hf(str(tmp_path / "plain"))


# ---- one conditional checkpoint for the 3-language toy set ---------------------------------------
@pytest.fixture(scope="module")
def toy_conditional(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond")
    rows = make_languages(50) + [{"text": row["text"], "label": ""} for row in make_languages(10, seed=1)]
    jsonl = root / "langs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.main(["--data", str(jsonl), "--class", "all", "--init", "scratch", "--preset", "tiny", "--lr", "1e-2",
                "--warmup-steps", "1", "--max-steps", "100", "--batch-size", "8", "--eval-every", "50", "--disc-weight", "10",
                "--val-reviews", "2", "--out", str(root / "all")])
    return jsonl, root / "all"


def test_one_conditional_checkpoint_classifies_the_toy_languages(toy_conditional, monkeypatch):
    jsonl, ckpt = toy_conditional
    log = [json.loads(line) for line in (ckpt / "log.jsonl").read_text().splitlines()]
    assert 0 <= log[-1]["val_accuracy"] <= 1 and log[0]["val_accuracy"] == pytest.approx(1 / 3)  # 6 texts: no bar here
    # it learned the languages (measured drops 6.6-6.9 nats/token over training seeds 0-7; on two threads 6.4-6.9)
    assert log[-1]["val_nats_per_token"] < log[0]["val_nats_per_token"] - 3
    assert math.isfinite(log[-1]["val_nats_per_token_no_class"])  # validation's NELBO with the label unknown
    # and a text is more likely under its own class than with "no class": by log 3 = 1.10 nats a text
    # if the label were certain (-log p(x | y) = -log p(x) + log 3 - log p(y | x)); measured, 16 draws on the
    # 15 test texts, over training seeds 0-7: 0.46-2.04 nats on one thread, 0.74-1.75 on two (docs/test_margins.md;
    # validation's 6 texts at 2 draws: 0.006-0.18 nats per token). A label that is not read: 0 exactly.
    test = data.load_dataset(str(jsonl), "test")[0]
    model, gaps = load_hf(str(ckpt)), []
    for c in range(3):
        tokens = data.encode([r.text for r in test if r.label == c])
        no_class = model.config.n_classes  # the label slot's mask index
        nelbo = scoring.score_draws([model, model], tokens, 16, 0, 16, "cpu", [c, no_class]).mean(-1)  # own, none
        gaps += list(nelbo[:, 1] - nelbo[:, 0])
    assert np.mean(gaps) > 0.1, gaps
    rows = make_languages(10, seed=7)  # new texts

    def accuracy(readout):
        # the NELBO readout needs draws: the label matters to p(text | label) only where most of the text is masked
        clf = DiffusionClassifier.from_checkpoints(str(ckpt), mc_samples=8, max_draws=32, readout=readout)
        assert clf.classes == sorted(LANGUAGES) and clf.class_labels == [0, 1, 2]
        return np.mean([p == r["label"] for p, r in zip(clf.predict([r["text"] for r in rows]), rows)])
    # both readouts of one checkpoint (chance 1/3). Another CPU's float rounding is another training
    # trajectory, so the bars hold across seeds: over --seed 0..7 (2-core x86) the posterior readout
    # scored 0.9 to 1.0 and the NELBO readout 0.8 to 1.0 (0.73 to 0.93 at 4 draws, the CLI test below)
    for readout, bar in zip(classify.READOUTS, (0.8, 0.6)):
        assert accuracy(readout) >= bar, readout
    # a slot that ignores the text (it sees every text position masked) predicts one class: 1/3
    real = diffusion.label_posterior
    monkeypatch.setattr(diffusion, "label_posterior", lambda model, x0, am=None: real(model, torch.full_like(x0, 50257), am))
    assert accuracy("posterior") < 0.5


def test_unlabeled_rows_are_the_unsup_split(toy_conditional, capsys):
    jsonl, ckpt = toy_conditional
    import data
    assert len(data.load_dataset(str(jsonl), "unsup")[0]) == 30
    assert len(data.load_dataset(str(jsonl), "train")[0]) == 135  # 150 labeled less the 10% test split


def test_classify_cli_with_one_conditional_checkpoint_calibrates_and_reports(toy_conditional, tmp_path):
    jsonl, ckpt = toy_conditional
    result = run_script("classify.py", "--ckpt", ckpt, "--data", jsonl, "--calibrate", "--mc-samples", "2", "--readout", "nelbo")
    assert result.returncode == 0, result.stderr
    saved = json.loads((ckpt / "calibration.json").read_text())["time"]
    assert saved["temperature"] > 0 and saved["n_texts"] == 6 and saved["checkpoints"] == [hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()]
    # the posterior readout's fit goes beside it, not over it
    result = run_script("classify.py", "--ckpt", ckpt, "--data", jsonl, "--calibrate")
    assert result.returncode == 0, result.stderr
    fits = json.loads((ckpt / "calibration.json").read_text())
    # beside them, each readout's fits of the n-gram model and the ensemble (test_ensemble.py)
    assert set(fits) == {"time", "posterior", "ngram", "ensemble+time", "ensemble+posterior"} and fits["time"] == saved
    out = tmp_path / "r.json"
    result = run_script("classify.py", "--ckpt", ckpt, "--data", jsonl, "--mc-samples", "4", "--json", out, "--readout", "nelbo")
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    assert summary["accuracy"] >= 0.6 and summary["temperature"] == saved["temperature"]  # picks the right class (chance 1/3)
    # the fit belongs to the weights, not the folder: a copy elsewhere keeps it
    copy = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(ckpt, copy)
    result = run_script("classify.py", "--ckpt", copy, "--data", jsonl, "--mc-samples", "4", "--readout", "nelbo")
    assert result.returncode == 0 and f"T = {saved['temperature']:.4g} from {copy / 'calibration.json'}" in result.stdout, result.stdout
    result = run_script("classify.py", "--ckpt", ckpt, "--data", jsonl, "--json", tmp_path / "p.json", "--readout", "posterior")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "p.json").read_text())["temperature"] == fits["posterior"]["temperature"]
    assert set(summary["calibration"]) == {"uncalibrated", "calibrated"}
    for row in summary["texts"]:
        nelbo = np.array(row["nelbo"])
        assert row["margin"] == pytest.approx(np.sort(nelbo)[1] - nelbo.min(), abs=2e-3) and row["margin_se"] > 0
        assert row["pred"] == summary["classes"][int(nelbo.argmin())]


UNSEEN = "table chair lamp desk sofa shelf table lamp chair desk"  # a vocabulary no toy language uses


def test_novelty_is_the_nelbo_of_the_text_with_the_label_unknown(toy_conditional):
    jsonl, ckpt = toy_conditional
    clf = DiffusionClassifier.from_checkpoints(str(ckpt))
    rows = make_languages(10, seed=7)
    tokens = data.encode([r["text"] for r in rows] + [UNSEEN])
    novelty = clf.novelty_encoded(tokens, draws=8)
    assert novelty.shape == (len(tokens),)
    assert novelty[-1] > novelty[:-1].max()  # an unseen vocabulary is more novel than every in-domain text (by 14+ nats/token, seeds 0-7)
    # the label unknown, not read from a class: with the same draws (common random numbers), a novelty
    # that read class c's NELBO would equal it to the last bit; the label-unknown NELBO differs from every
    # class's by whole hundredths of a nat (a threshold of 1e-3 holds on any machine's float rounding)
    per_class = scoring.score_draws([clf.models[0]] * 3, tokens[:-1], 8, clf.seed, 16, "cpu", [0, 1, 2]).mean(-1)
    per_class /= np.array([len(t) for t in tokens[:-1]])[:, None]
    for c in range(3):
        assert np.abs(novelty[:-1] - per_class[:, c]).mean() > 1e-3, c


def test_novelty_of_each_input_text_is_printed(toy_conditional):
    jsonl, ckpt = toy_conditional
    in_domain = " ".join(LANGUAGES["animals"])
    result = run_script("classify.py", "--ckpt", ckpt, "--input", "-", "--novelty", stdin=f"{in_domain}\n{UNSEEN}\n")
    assert result.returncode == 0, result.stderr
    header, *rows = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    assert header[3] == "novelty (nats/token)" and [r[0] for r in rows] == ["1", "2"]
    assert float(rows[1][3]) > float(rows[0][3])  # the unseen vocabulary: the more novel, on its own line


def test_classify_novelty_data_reports_the_aurocs_and_plot_draws_them(toy_conditional, tmp_path):
    jsonl, ckpt = toy_conditional
    other = tmp_path / "other.txt"
    words = UNSEEN.split()
    other.write_text("".join(" ".join(words[i:] + words[:i]) + "\n" for i in range(5)))  # 5 texts, one per line
    out = tmp_path / "nov.json"
    result = run_script("classify.py", "--ckpt", ckpt, "--data", jsonl, "--novelty-data", other, "--json", out)
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    nov = doc["novelty"]
    # AUROC 1: every unseen text above every test text (by 14.1-17.7 nats/token over training seeds 0-7, 1-2 threads)
    assert nov["n_other"] == 5 and len(nov["other"]) == 5 and nov["auroc"]["novelty"] == 1.0
    assert 0 <= nov["auroc"]["max_posterior"] <= 1
    assert all(row["novelty_nats_per_token"] >= 0 for row in doc["texts"])  # a bound on -log p(text) per token
    assert "AUROC of telling them apart: novelty 1.0000" in result.stdout
    pytest.importorskip("matplotlib")
    result = run_script("plot.py", out, "--out", tmp_path / "png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "png" / "nov_novelty.png").stat().st_size > 1000


def test_a_model_scored_as_two_classes_sees_the_same_draws():
    """Common random numbers: the same model under two class names sees the same draws."""
    model = load_hf(str(FIXTURE))
    texts = [[5, 17, 42, 8, 30, 61], [12, 0, 33, 7], list(range(1, 60))]
    for estimator in scoring.ESTIMATORS:
        clf = DiffusionClassifier([model, model], ["a", "b"], mc_samples=3, max_draws=3, estimator=estimator)
        draws = clf.draws(texts)
        assert draws.shape == (3, 2, 3) and np.all(draws >= 0) and np.mean(draws > 0) > 0.5
        np.testing.assert_allclose(draws[:, 0], draws[:, 1], rtol=1e-5, atol=0)  # other draws would differ by nats


def test_predict_refuses_a_string():
    model = load_hf(str(FIXTURE))
    with pytest.raises(TypeError, match="list of strings"):
        DiffusionClassifier([model, model], ["a", "b"]).predict("dog cow")


# ---- the count estimator -----------------------------------------------------------------------
def test_count_draws_are_stratified_uniform_counts_of_uniform_subsets():
    n, k = 5, 5
    masks = diffusion.per_text_count_draws([n] * 4000, k, list(range(4000))).view(4000, k, n)
    counts = masks.sum(-1)
    assert all(sorted(row) == [1, 2, 3, 4, 5] for row in counts.tolist())  # K = n: every count exactly once
    # given its count, every position is equally likely to be masked
    for c in (1, 3):
        chosen = masks[counts == c].float().mean(0)
        assert torch.allclose(chosen, torch.full((n,), c / n), atol=0.03), chosen


def test_count_estimator_is_unbiased_for_the_continuous_time_nelbo():
    model = load_hf(str(FIXTURE))
    for ids in ([5, 17, 42, 8, 30, 61], [12, 0, 33, 7]):
        exact = exact_nelbo(model, ids, lo=0.0, eps=0.0)  # the eps -> 0 continuous-time NELBO
        est = scoring.score_texts([model], [ids] * 1500, 2, 0, batch_size=512, device="cpu", estimator="count")[:, 0]
        se = est.std(ddof=1) / math.sqrt(len(est))
        assert abs(est.mean() - exact) < 4 * se, f"MC mean {est.mean():.3f} vs exact {exact:.3f} (se {se:.3f})"
        assert se < 0.01 * exact  # sharp enough to see a wrong weight (n/(k+1) is 15-20% off)


def test_count_estimator_has_a_smaller_paired_standard_error_than_the_time_estimator():
    """Two different class models, one text, K = 4: the spread over seeds of the K-draw NELBO difference."""
    torch.manual_seed(0)
    models = []
    for seed in (0, 1):
        m = load_hf(str(FIXTURE))
        with torch.no_grad():
            m.output_layer.linear.bias.add_(torch.randn(64, generator=torch.Generator().manual_seed(seed)))
        models.append(m)
    ids = torch.randint(0, MASK, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    spread = {}
    for estimator in scoring.ESTIMATORS:
        d = scoring.score_texts(models, [ids] * 300, 4, 0, batch_size=512, device="cpu", estimator=estimator)
        spread[estimator] = np.std(d[:, 0] - d[:, 1], ddof=1)
    assert spread["count"] < 0.9 * spread["time"], spread  # measured: 8.2 vs 10.3 nats (300 replicates)


def test_count_estimator_refuses_a_time_conditioned_model():
    model = DiT(DiTConfig(vocab_size=64, model_length=8, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2, time_conditioning=True))
    with pytest.raises(ValueError, match="time conditioning"):
        diffusion.nelbo_count(model, torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool))


# ---- the loss of a step ------------------------------------------------------------------------
def test_a_step_loss_does_not_depend_on_how_its_texts_are_split_into_micro_batches():
    torch.manual_seed(0)
    model = load_hf(str(FIXTURE)).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.config.dropout = 0.0
    for block in model.blocks:
        block.dropout = 0.0
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(0, MASK, (n,), generator=g) for n in (3, 20, 5, 31)]  # lengths 3..31: a 10x spread
    t = torch.tensor([0.3, 0.5, 0.7, 0.9])
    masked = [torch.rand(len(x), generator=g) < t[i] for i, x in enumerate(texts)]
    total = sum(len(x) for x in texts)

    def part(rows):
        L = max(len(texts[i]) for i in rows)
        x0 = torch.zeros(len(rows), L, dtype=torch.long)
        am, mk = torch.zeros(len(rows), L, dtype=torch.bool), torch.zeros(len(rows), L, dtype=torch.bool)
        for j, i in enumerate(rows):
            x0[j, :len(texts[i])], am[j, :len(texts[i])], mk[j, :len(texts[i])] = texts[i], True, masked[i]
        # uniforms that mask exactly mk: 0 where masked, 1 (never below a rate) elsewhere
        return train.MicroBatch(0, x0, am, t[rows], (~mk).float(), None)

    results = []
    for split in ([[0, 1, 2, 3]], [[0], [1, 2, 3]], [[0, 2], [1, 3]]):
        model.zero_grad()
        loss, _ = train.step_backward(model, [part(rows) for rows in split], total)
        results.append((float(loss), torch.cat([p.grad.flatten() for p in model.parameters()])))
    scale = float(results[0][1].abs().max())  # float32 rounding in another order, relative to the gradient's size
    for loss, grad in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        torch.testing.assert_close(grad, results[0][1], atol=1e-4 * scale, rtol=1e-3)


# ---- calibration -------------------------------------------------------------------------------
def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    for true_t in (0.5, 3.0, 40.0):
        logits = rng.normal(size=(20000, 3)) * 2  # the true log-probabilities up to a constant
        labels = np.array([rng.choice(3, p=p) for p in calibration.softmax(logits)])
        fitted = calibration.fit_temperature(logits * true_t, labels)  # scores that are true_t times too sharp
        assert fitted == pytest.approx(true_t, rel=0.05)


def test_ece_on_known_cases():
    # ten texts at confidence 0.8, half right: one bin, |0.5 - 0.8| = 0.3
    probs = np.array([[0.8, 0.2]] * 10)
    assert calibration.ece(probs, np.array([0] * 5 + [1] * 5)) == pytest.approx(0.3)
    # two bins: 4 texts at 0.95 all right (gap 0.05), 6 at 0.6 with 3 right (gap 0.1): 0.4 * 0.05 + 0.6 * 0.1
    probs = np.array([[0.95, 0.05]] * 4 + [[0.6, 0.4]] * 6)
    labels = np.array([0] * 4 + [0, 0, 0, 1, 1, 1])
    assert calibration.ece(probs, labels) == pytest.approx(0.08)
    assert calibration.ece(np.array([[0.7, 0.3]] * 10), np.array([0] * 7 + [1] * 3)) == pytest.approx(0.0)


def test_variance_cli_measures_the_standard_error_against_k(toy_conditional, tmp_path):
    jsonl, ckpt = toy_conditional
    out = tmp_path / "v.json"
    result = run_script("variance.py", "--ckpt", ckpt, "--data", jsonl, "--limit", "6", "--ks", "1,16",
                        "--replicates", "8", "--json", out)
    assert result.returncode == 0, result.stderr
    rows = {(r["estimator"], r["k"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(e, k) for e in scoring.ESTIMATORS for k in (1, 16)}
    # 16x the draws: ideally 1/4 the standard error. Its estimate is noisy (one draw's NELBO is skewed: a
    # small t weighs 1/t): with 8 replicates, se(16) / se(1) was 0.10-0.38 over training seeds 0-7 on one
    # thread and on two (docs/test_margins.md); 4 replicates gave 0.76 on one of these models.
    for estimator in scoring.ESTIMATORS:
        assert 0 < rows[estimator, 16]["se"] < 0.6 * rows[estimator, 1]["se"], rows


def test_curve_and_sequential_cli(toy_conditional, tmp_path):
    """variance.py --curve: fixed K takes exactly K draws a text, sequential between its first round and
    its maximum; classify.py --max-draws reports the draws it took, per text and on average."""
    jsonl, ckpt = toy_conditional
    out = tmp_path / "curve.json"
    result = run_script("variance.py", "--ckpt", ckpt, "--data", jsonl, "--limit", "6", "--curve", "--ks", "4",
                        "--sequential", "2:8", "--json", out)
    assert result.returncode == 0, result.stderr
    fixed, seq = json.loads(out.read_text())["rows"]
    assert fixed["mean_draws"] == 4 and 2 <= seq["mean_draws"] <= 8
    # its accuracies are the classifier's on the same held-out texts with the same draws (a bar on them
    # would test the toy model: 0.33-0.83 on these 6 texts over training seeds 0-7)
    val = data.balanced_subset(data.train_val_split(data.load_dataset(str(jsonl), "train")[0])[1], 6)
    for row, (k, most) in zip((fixed, seq), ((4, 4), (2, 8))):
        clf = DiffusionClassifier.from_checkpoints(str(ckpt), readout="nelbo", mc_samples=k, max_draws=most)
        predicted = clf.class_scores([r.text for r in val]).argmin(1)
        assert sum(map(sum, row["confusion_matrix"])) == 6
        assert row["accuracy"] == np.mean(predicted == np.array([r.label for r in val])), row
    out = tmp_path / "c.json"
    result = run_script("classify.py", "--ckpt", ckpt, "--data", jsonl, "--mc-samples", "2", "--max-draws", "8", "--json", out,
                        "--readout", "nelbo")
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    draws = [t["draws"] for t in summary["texts"]]
    assert set(draws) <= {2, 4, 6, 8} and summary["mean_draws"] == pytest.approx(np.mean(draws))
    result = run_script("classify.py", "--ckpt", ckpt, "--data", jsonl, "--mc-samples", "4", "--max-draws", "6", "--readout", "nelbo")
    assert result.returncode == 2 and "--max-draws: 6 is not a multiple of --mc-samples 4" in result.stderr


def test_accuracy_interval_is_wilsons():
    # all 10 right: the Wilson interval is [n / (n + z^2), 1] (z = 1.96), not the degenerate [1, 1] of p +- z se
    r = classify.accuracy_report(np.zeros(10, dtype=int), np.zeros(10, dtype=int), ["a", "b"])
    assert r["accuracy_ci95"] == pytest.approx([10 / (10 + 1.96 ** 2), 1.0])
    # 738 of 1000 (the README's first IMDB run): about +-2.7 points, a little off-centre towards 0.5
    low, high = classify.accuracy_report(np.r_[np.zeros(738), np.ones(262)].astype(int), np.zeros(1000, dtype=int), ["a", "b"])["accuracy_ci95"]
    assert 0.709 < low < 0.711 and 0.764 < high < 0.765


def test_count_estimator_without_an_attention_mask_weights_by_the_full_length():
    model = load_hf(str(FIXTURE))
    x0 = torch.tensor([[5, 17, 42, 8, 30, 61]])
    masked = torch.tensor([[True, False, True, False, False, False]])
    alone = diffusion.nelbo_count(model, x0, masked)
    with torch.no_grad():
        logits = model(torch.where(masked, MASK, x0), torch.zeros(1))[0, :, :MASK].log_softmax(-1)
    expected = -(logits[0, 5] + logits[2, 42]) * 6 / 2  # n / k = 6 / 2
    torch.testing.assert_close(alone, expected[None], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(diffusion.nelbo_count(model, x0, masked, torch.ones(1, 6, dtype=torch.bool)), alone)


def test_a_time_conditioned_checkpoint_asks_for_the_time_estimator(tmp_path):
    cfg = DiTConfig(vocab_size=50258, model_length=16, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2, time_conditioning=True)
    for name in ("a", "b"):
        save_checkpoint(DiT(cfg).state_dict(), cfg, tmp_path / name, {"class_index": "ab".index(name), "class_name": name})
    result = run_script("classify.py", "--ckpt", tmp_path / "a", "--ckpt", tmp_path / "b", "--input", "-",
                        "--estimator", "count", stdin="a text\n")
    assert result.returncode == 1 and "pass --estimator time" in result.stderr and "Traceback" not in result.stderr
    result = run_script("classify.py", "--ckpt", tmp_path / "a", "--ckpt", tmp_path / "b", "--input", "-", stdin="a text\n")
    assert result.returncode == 0, result.stderr  # the default estimator (time) takes it


def test_the_confusion_matrix_has_true_classes_as_rows():
    # 3 texts of class a (1 right, 2 called b) and 1 of class b (right): row a = [1, 2], row b = [0, 1]
    r = classify.accuracy_report(np.array([0, 0, 0, 1]), np.array([0, 1, 1, 1]), ["a", "b"])
    assert r["confusion_matrix"] == [[1, 2], [0, 1]]
    assert r["per_class"]["a"]["recall"] == pytest.approx(1 / 3) and r["per_class"]["b"]["precision"] == pytest.approx(1 / 3)


def test_the_optimizer_sees_gradients_clipped_to_norm_1(imdb_tree, tmp_path, monkeypatch):
    """train.py clips the gradient's global norm at 1 before AdamW steps (the log keeps the norm before clipping)."""
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "o"
    train.main(["--data", str(imdb_tree), "--class", "0", "--init", "scratch", "--preset", "tiny", "--max-steps", "3",
                "--warmup-steps", "1", "--batch-size", "4", "--eval-every", "3", "--val-reviews", "1", "--out", str(out)])
    logged = [json.loads(line)["grad_norm"] for line in (out / "log.jsonl").read_text().splitlines()[1:]]
    assert len(seen) == 3 and max(logged) > 1.5  # the raw gradients are larger than 1: clipping has work to do
    assert all(norm <= 1 + 1e-4 for norm in seen), seen
