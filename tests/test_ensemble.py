"""The ensemble classifier: the n-gram component (nblr.py) that train.py fits beside the MDLM, the
combiner fitted on held-out texts (calibration.fit_ensemble), and classify.py's three readouts."""
import json

import numpy as np
import pytest

import calibration
import classify
import data
import train
from classify import DiffusionClassifier
from conftest import LANGUAGES, make_languages
from convert_hf import CheckpointError
from nblr import CONFIG, WEIGHTS, NBLR
from scoring import score_posterior

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread
NAMES = sorted(LANGUAGES)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tagged(n: int, seed: int = 0) -> list[dict]:
    """Toy-language rows, each with a word of its own ("uid<i>"): what the n-gram model's vocabulary
    holds tells which texts it was fitted on."""
    return [{"text": f"{r['text']} uid{i}", "label": r["label"]} for i, r in enumerate(make_languages(n, seed))]


def fit_args(out, data_path, *extra):
    return ["--class", "all", "--data", str(data_path), "--init", "scratch", "--preset", "tiny", "--lr", "1e-2",
            "--warmup-steps", "1", "--max-steps", "30", "--batch-size", "8", "--eval-every", "30",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    """A joint MDLM with its n-gram model, trained on 3 toy languages (40 texts each), calibrated."""
    root = tmp_path_factory.mktemp("ensemble")
    path = write_jsonl(root / "langs.jsonl", tagged(40))
    train.main(fit_args(root / "all", path))
    classify.main(["--ckpt", str(root / "all"), "--data", str(path), "--calibrate"])
    return root, path


# ---- the n-gram component ----------------------------------------------------------------------
def test_nblr_learns_reads_back_and_scores_every_class():
    rows = make_languages(20)
    texts, labels = [r["text"] for r in rows], [NAMES.index(r["label"]) for r in rows]
    model = NBLR.fit(texts, labels, NAMES)
    new = make_languages(10, seed=3)
    log_p = model.log_proba([r["text"] for r in new])
    assert log_p.shape == (30, 3) and np.allclose(np.logaddexp.reduce(log_p, axis=1), 0.0)
    # disjoint vocabularies: every new text to its own language (a sign flipped, or columns swapped, gets 0)
    assert np.mean(log_p.argmax(1) == [NAMES.index(r["label"]) for r in new]) == 1.0
    two = NBLR.fit(texts[:40], [min(y, 1) for y in labels[:40]], ["a", "b"])  # binary: one row, sigma(z) for class 1
    assert two.weight.shape[0] == 1
    assert np.allclose(np.exp(two.log_proba(["cat dog"])).sum(), 1.0)


def test_saved_nblr_round_trips_and_is_strict(tmp_path):
    rows = make_languages(10)
    model = NBLR.fit([r["text"] for r in rows], [NAMES.index(r["label"]) for r in rows], NAMES)
    model.save(tmp_path)
    assert not any(p.suffix in (".pkl", ".pickle", ".joblib") for p in tmp_path.iterdir())
    again = NBLR.load(tmp_path, NAMES)
    texts = [r["text"] for r in make_languages(5, seed=2)]
    np.testing.assert_array_equal(again.log_proba(texts), model.log_proba(texts))
    assert NBLR.load(tmp_path / "nothing", NAMES) is None  # a folder without one: no n-gram model
    with pytest.raises(CheckpointError, match=r"classes \['animals', 'colors', 'numbers'\], the MDLM's are"):
        NBLR.load(tmp_path, ["a", "b", "c"])
    config = json.loads((tmp_path / CONFIG).read_text())
    for edit, words in [(lambda c: c.pop("alpha"), "keys"), (lambda c: c.update(extra=1), "keys"),
                        (lambda c: c.update(format=99), "format 99"), (lambda c: c.update(C=2.0), "'C' is 2.0"),
                        (lambda c: c["vocabulary"].pop(), r"expected \(3, ")]:
        bad = json.loads(json.dumps(config))
        edit(bad)
        (tmp_path / CONFIG).write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=words):
            NBLR.load(tmp_path, NAMES)
    (tmp_path / CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{CONFIG}: not JSON"):
        NBLR.load(tmp_path, NAMES)
    (tmp_path / CONFIG).unlink()
    with pytest.raises(CheckpointError, match=f"{CONFIG}: missing"):
        NBLR.load(tmp_path, NAMES)


# ---- the combiner ------------------------------------------------------------------------------
def test_fit_ensemble_recovers_the_weights_of_a_known_logistic_model():
    rng = np.random.default_rng(0)
    n, w, b = 20000, np.array([0.5, 2.0]), np.array([0.0, -0.7, 0.4])
    features = rng.normal(size=(n, 2, 3))
    logits = np.einsum("nmc,m->nc", features, w) + b
    labels = np.array([rng.choice(3, p=p) for p in calibration.softmax(logits)])
    fitted_w, fitted_b = calibration.fit_ensemble(features, labels)
    # the estimate's standard error at n = 20,000 is about 0.01-0.02; a sign flip or a lost bias is off by > 0.4
    np.testing.assert_allclose(fitted_w, w, atol=0.1)
    np.testing.assert_allclose(fitted_b, b, atol=0.1)
    # temperature scaling after the weights finds nothing to change: they carry the scale
    assert calibration.fit_temperature(calibration.ensemble_logits(features, fitted_w, fitted_b), labels) == \
        pytest.approx(1.0, abs=0.02)


# ---- train.py fits it beside the MDLM on the MDLM's labeled texts -------------------------------
def ngram_uids(folder) -> set[str]:
    return {g for g in json.loads((folder / CONFIG).read_text())["vocabulary"] if g.startswith("uid")}


def test_the_ngram_model_is_fitted_on_the_labeled_training_texts_only(joint, tmp_path):
    root, path = joint
    reviews, _ = data.load_dataset(str(path), "train")
    train_part, val = data.train_val_split(reviews)
    uid = lambda r: r.text.split()[-1]
    # every labeled training text, no validation or test text (their uid words would be in the vocabulary)
    assert ngram_uids(root / "all") == {uid(r) for r in train_part}
    assert not ngram_uids(root / "all") & {uid(r) for r in val}
    # --labeled-limit N: the same N texts as the joint model's labels; a class model holds the same copy
    args = fit_args(tmp_path / "few", path, "--labeled-limit", "12", "--max-steps", "1")
    train.main(args)
    kept = data.labeled_limit(train_part, 12, 0)[0]
    assert ngram_uids(tmp_path / "few") == {uid(r) for r in kept}
    cls_args = [a if a != "all" else "colors" for a in args]
    train.main([a if a != str(tmp_path / "few") else str(tmp_path / "colors") for a in cls_args])
    assert (tmp_path / "colors" / WEIGHTS).read_bytes() == (tmp_path / "few" / WEIGHTS).read_bytes()


# ---- classify.py: the three readouts ------------------------------------------------------------
def test_components_are_the_mdlm_posterior_and_the_ngram_posterior(joint):
    root, path = joint
    clf = DiffusionClassifier.from_checkpoints(str(root / "all"))
    assert clf.combine == "ensemble" and clf.readout_name == "ensemble"
    texts = [r["text"] for r in make_languages(5, seed=4)]
    tokens = data.encode(texts)
    features = clf.components(clf.class_scores_encoded(tokens), texts)
    model = clf.models[0]
    direct = score_posterior(model, tokens, 16, "cpu", clf.log_prior)  # log p(c | text) from the denoiser
    np.testing.assert_allclose(features[:, 0], direct, atol=1e-6)
    np.testing.assert_allclose(features[:, 1], NBLR.load(root / "all", NAMES).log_proba(texts), atol=1e-12)


def test_calibration_fits_each_component_and_the_ensemble_on_validation_texts(joint):
    root, path = joint
    fits = json.loads((root / "all" / calibration.FILE).read_text())
    assert set(fits) == {"posterior", "ngram", "ensemble+posterior"}
    reviews, _ = data.load_dataset(str(path), "train")
    n_val = len(data.train_val_split(reviews)[1])
    assert all(f["n_texts"] == n_val for f in fits.values())
    ensemble = fits["ensemble+posterior"]
    assert len(ensemble["weights"]) == 2 and len(ensemble["bias"]) == 3 and ensemble["bias"][0] == 0.0
    # the ensemble fit is keyed to both components' weights: a retrained n-gram model loses it
    assert ensemble["checkpoints"] == calibration.calibration_key([str(root / "all")], ngram=True)


def test_weights_are_fitted_on_held_out_training_texts_not_the_test_split(tmp_path):
    # an IMDB tree whose test split contradicts its training texts (pos and neg swapped): a fit on the
    # test split would give the n-gram model a negative weight; one on the held-out training texts, positive
    from conftest import make_imdb_tree
    tree = make_imdb_tree(tmp_path / "imdb", n=40)
    test = tree / "aclImdb" / "test"
    (test / "pos").rename(test / "tmp")
    (test / "neg").rename(test / "pos")
    (test / "tmp").rename(test / "neg")
    train.main(fit_args(tmp_path / "m", tree, "--max-steps", "5"))
    classify.main(["--ckpt", str(tmp_path / "m"), "--data", str(tree), "--calibrate"])
    weights = json.loads((tmp_path / "m" / calibration.FILE).read_text())["ensemble+posterior"]["weights"]
    assert weights[1] > 0  # the n-gram model agrees with the held-out training texts
    out = tmp_path / "r.json"
    classify.main(["--ckpt", str(tmp_path / "m"), "--data", str(tree), "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["readout"] == "ensemble" and result["accuracy"] < 0.5 and result["components"]["ngram"]["accuracy"] < 0.5


def test_classify_reports_the_ensemble_and_each_component_alone(joint, tmp_path, capsys):
    root, path = joint
    out = tmp_path / "r.json"
    classify.main(["--ckpt", str(root / "all"), "--data", str(path), "--json", str(out)])
    printed = capsys.readouterr().out
    assert "ensemble readout:" in printed.splitlines()[0]
    assert "alone, MDLM (posterior): accuracy" in printed and "alone, NB-LR: accuracy" in printed
    result = json.loads(out.read_text())
    rows, names = result["texts"], result["classes"]
    labels = np.array([names.index(r["label"]) for r in rows])
    for key, name in (("mdlm_log_posterior", "mdlm"), ("ngram_log_posterior", "ngram")):
        log_p = np.array([r[key] for r in rows])  # each component's posterior, per text
        assert np.allclose(np.logaddexp.reduce(log_p, axis=1), 0.0, atol=1e-3)
        assert np.mean(log_p.argmax(1) == labels) == result["components"][name]["accuracy"]
    w, b = np.array(result["ensemble"]["weights"]), np.array(result["ensemble"]["bias"])
    features = np.stack([[r["mdlm_log_posterior"] for r in rows], [r["ngram_log_posterior"] for r in rows]], 1)
    expected = calibration.softmax(calibration.ensemble_logits(features, w, b))
    np.testing.assert_allclose([r["posterior"] for r in rows], expected, atol=2e-3)  # the JSON's 4-decimal rounding
    for readout, words in (("posterior", "posterior readout (one pass per window)"), ("ngram", "ngram readout")):
        classify.main(["--ckpt", str(root / "all"), "--data", str(path), "--readout", readout])
        first = capsys.readouterr().out.splitlines()[0]
        assert words in first and "ensemble" not in first


def test_a_checkpoint_without_an_ngram_model_is_read_alone_and_named(joint, tmp_path, capsys):
    root, path = joint
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((root / "all" / name).read_bytes())
    assert DiffusionClassifier.from_checkpoints(str(bare)).readout_name == "posterior"
    with pytest.raises(SystemExit):
        classify.main(["--ckpt", str(bare), "--data", str(path), "--readout", "ngram"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no n-gram model (ngram.safetensors) for --readout ngram" in err[0]
    (bare / CONFIG).write_text("{")
    with pytest.raises(SystemExit):
        classify.main(["--ckpt", str(bare), "--data", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{WEIGHTS}: missing" in err[0]


def test_fit_trains_both_and_predict_proba_is_the_calibrated_ensemble(tmp_path):
    rows = make_languages(40)  # 2 held-out texts per class: too few to fit the weights (MIN_FIT_CALIBRATION)
    clf = DiffusionClassifier(max_steps=5, lr=1e-2, batch_size=8, out=str(tmp_path / "small"))
    clf.fit([r["text"] for r in rows], [r["label"] for r in rows])
    assert clf.combine == "ensemble" and "uncalibrated" in clf.temperature_source
    rows = make_languages(400)  # 20 per class held out: fitted
    clf = DiffusionClassifier(max_steps=5, lr=1e-2, batch_size=8, out=str(tmp_path / "fit"))
    clf.fit([r["text"] for r in rows], [r["label"] for r in rows])
    assert clf.combine == "ensemble" and "fitted" in clf.temperature_source
    new = [r["text"] for r in make_languages(5, seed=9)]
    features = clf.components(clf.class_scores_encoded(data.encode(new)), new)
    expected = calibration.softmax(calibration.ensemble_logits(features, clf.ensemble_weights, clf.ensemble_bias))
    np.testing.assert_allclose(clf.predict_proba(new), expected, atol=1e-9)
    saved = clf.save(tmp_path / "copy")
    assert {CONFIG, WEIGHTS, calibration.FILE} <= {p.name for p in saved.iterdir()}
    again = DiffusionClassifier.from_checkpoints(str(saved))
    np.testing.assert_allclose(again.ensemble_weights, clf.ensemble_weights)
    np.testing.assert_allclose(again.predict_proba(new), clf.predict_proba(new), rtol=1e-4, atol=1e-7)


def test_class_models_share_one_ngram_model_and_read_nelbo_in_the_ensemble(joint, tmp_path, capsys):
    root, path = joint
    folders = []
    for name in NAMES:  # one model per class, one step each: the ensemble's plumbing, not its accuracy
        folders.append(tmp_path / name)
        train.main([a if a != "all" else name for a in fit_args(folders[-1], path, "--max-steps", "1")])
    ckpts = [x for f in folders for x in ("--ckpt", str(f))]
    classify.main([*ckpts, "--data", str(path), "--calibrate", "--limit", "6"])
    assert set(json.loads((folders[0] / calibration.FILE).read_text())) == {"time", "ngram", "ensemble+time"}
    capsys.readouterr()
    classify.main([*ckpts, "--data", str(path), "--mc-samples", "2", "--max-draws", "2"])
    first = capsys.readouterr().out.splitlines()[0]
    assert "ensemble readout:" in first and "log p_MDLM (nelbo, K=2 (time))" in first
    train.main([a if a != "all" else NAMES[0] for a in fit_args(tmp_path / "other", path, "--max-steps", "1",
                                                                "--labeled-limit", "30")])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        classify.main(["--ckpt", str(tmp_path / "other"), *ckpts[2:], "--data", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not" in err[0] and "one label set" in err[0]


def test_novelty_datas_max_posterior_is_the_readouts_own(joint, tmp_path):
    root, path = joint
    other = tmp_path / "other.txt"
    other.write_text("red cat one\nblue two dog\ngreen horse three\n")
    out = tmp_path / "n.json"
    classify.main(["--ckpt", str(root / "all"), "--data", str(path), "--limit", "6", "--readout", "ngram",
                   "--novelty-data", str(other), "--novelty-draws", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    temperature = json.loads((root / "all" / calibration.FILE).read_text())["ngram"]["temperature"]
    log_p = NBLR.load(root / "all", NAMES).log_proba(other.read_text().splitlines())
    expected = calibration.softmax(log_p, temperature).max(1)  # NB-LR's posterior: the readout asked for
    np.testing.assert_allclose([r["max_posterior"] for r in result["novelty"]["other"]], expected, atol=1e-5)


def test_novelty_takes_strings_like_predict(joint):
    root, _ = joint
    clf = DiffusionClassifier.from_checkpoints(str(root / "all"))
    texts = ["cat dog horse", "red green one"]
    nats = clf.novelty(texts, draws=2)
    assert nats.shape == (2,) and np.all(nats > 0)
    np.testing.assert_array_equal(nats, clf.novelty_encoded(data.encode(texts), draws=2))
    with pytest.raises(TypeError, match="list of strings"):
        clf.novelty("cat dog horse")
