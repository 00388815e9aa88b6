"""baselines.py --tokens bpe: the classical models read the diffusion model's own GPT-2 tokens."""
import numpy as np
import pytest

pytest.importorskip("sklearn")
import baselines
import data


def test_bpe_features_are_the_models_token_ids_and_their_bigrams():
    reviews = [data.Review("Great film.<br />Loved it", 1, 0, 9), data.Review("Awful FILM", 0, 0, 2),
               data.Review("great, great", 1, 1, 8), data.Review("awful film, awful", 0, 1, 1)]
    texts, labels = baselines.texts_and_labels(reviews, "bpe")
    ids = data.encode([r.text for r in reviews])  # "<br />" -> newline, case kept: what train.py feeds the model
    assert texts == [" ".join(map(str, x)) for x in ids] and labels.tolist() == [1, 0, 1, 0]
    models = baselines.baselines("bpe")
    assert sorted(models) == sorted(f"{m} (BPE {g})" for m in ("TF-IDF + LR", "NB-LR", "MNB") for g in ("unigrams", "uni+bigrams"))
    uni, bi = models["MNB (BPE unigrams)"].fit(texts, labels), models["MNB (BPE uni+bigrams)"].fit(texts, labels)
    assert set(uni[0].vocabulary_) == {str(i) for x in ids for i in x}  # one feature per BPE id, nothing lowercased or split
    assert set(bi[0].vocabulary_) == set(uni[0].vocabulary_) | {f"{a} {b}" for x in ids for a, b in zip(x, x[1:])}
    assert np.mean(bi.predict(texts) == labels) == 1.0
