"""DiffusionClassifier.fit / save: train.py's recipe in-process, scikit-learn's conventions."""
import json

import numpy as np
import pytest
import torch

import classify

from classify import DiffusionClassifier
from conftest import LANGUAGES, make_languages

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    rows = make_languages(40)
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    texts += [r["text"] for r in make_languages(5, seed=1)]
    labels += [None] * 15  # unlabeled texts: they train p(text)
    out = tmp_path_factory.mktemp("fit") / "ckpt"
    clf = DiffusionClassifier(max_steps=40, lr=1e-2, batch_size=8, eval_every=20, out=str(out))
    assert clf.fit(texts, labels) is clf  # fit returns self
    return clf, out


def test_fit_learns_the_toy_languages_and_save_round_trips(fitted, tmp_path):
    clf, out = fitted
    assert clf.classes_ == sorted(LANGUAGES) and clf.readout == "posterior" and clf.combine == "ensemble"
    rows = make_languages(10, seed=7)  # new texts
    texts = [r["text"] for r in rows]
    # the MDLM alone (the ensemble's first component): chance 1/3; measured 0.93-1.0 over fit's seeds 0-7
    # (the bar: 24 of 30, P < 1e-7 at chance)
    mdlm = clf.components(clf.class_scores_encoded(classify.data.encode(texts)), texts)[:, 0]
    labels = [clf.classes_.index(r["label"]) for r in rows]
    assert np.mean(mdlm.argmax(1) == labels) >= 0.8
    assert np.mean([p == r["label"] for p, r in zip(clf.predict(texts), rows)]) >= 0.8  # the ensemble
    config = json.loads((out / "config.json").read_text())
    assert config["n_unlabeled"] == 15 and config["train_args"]["unlabeled"] is True and config["step"] == 40
    saved = clf.save(tmp_path / "mine")
    # no train state; the n-gram component beside the MDLM
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors", "ngram.json",
                                                       "ngram.safetensors"]
    again = DiffusionClassifier.from_checkpoints(str(saved))
    weights, copied = clf.models[0].state_dict(), again.models[0].state_dict()
    assert weights.keys() == copied.keys() and all(torch.equal(weights[k], copied[k]) for k in weights)  # bit for bit
    assert again.classes_ == clf.classes_ and again.models[0].config == clf.models[0].config
    # the same weights, the same posteriors, up to float32 rounding (its order varies with the machine's kernels)
    np.testing.assert_allclose(again.predict_proba(texts), clf.predict_proba(texts), rtol=1e-4, atol=1e-7)
    # a calibrated model keeps its temperature in the copy (the fit names the folder it is for)
    data_file = tmp_path / "langs.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in make_languages(40)))
    classify.main(["--ckpt", str(out), "--data", str(data_file), "--calibrate"])
    calibrated = DiffusionClassifier.from_checkpoints(str(out))
    moved = DiffusionClassifier.from_checkpoints(str(calibrated.save(tmp_path / "calibrated")))
    mdlm_t = calibrated.components_["mdlm"][0]  # the MDLM's own T; the ensemble's weights carry its own scale
    assert moved.components_["mdlm"][0] == mdlm_t != 1.0 and "calibration.json" in moved.temperature_source
    np.testing.assert_array_equal(moved.ensemble_weights, calibrated.ensemble_weights)
    np.testing.assert_allclose(moved.predict_proba(texts), calibrated.predict_proba(texts), rtol=1e-4, atol=1e-7)


def test_fit_errors_name_the_argument():
    clf = DiffusionClassifier(max_steps=0)
    with pytest.raises(ValueError, match="no model yet"):
        clf.predict(["cat dog"])
    with pytest.raises(ValueError, match="labels: 1 labels for 2 texts"):
        clf.fit(["cat dog", "red blue"], ["animals"])
    with pytest.raises(ValueError, match="labels: 1 class"):
        clf.fit(["cat dog", "red blue"], ["animals", None])
    with pytest.raises(ValueError, match="^fit: argument max_steps: must be > 0"):
        clf.fit(["cat dog", "red blue"], ["animals", "colors"])
    with pytest.raises(TypeError, match="list of strings"):
        clf.fit("cat dog", ["animals"])
    with pytest.raises(ValueError, match="save: nothing to save"):
        clf.save("x")
    with pytest.raises(ValueError, match="mc_samples 0"):  # scoring settings: refused before any training
        DiffusionClassifier(mc_samples=0)
