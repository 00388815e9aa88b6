"""data: aclImdb layout (folder and tarball), splits, subsets, tokens and batches."""
import tarfile

import numpy as np
import pytest
import torch

import data
from data import DataError, Review


def test_folder_and_tarball_read_the_same_reviews(imdb_tree, tmp_path):
    tarball = tmp_path / "aclImdb_v1.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(imdb_tree / "aclImdb", arcname="aclImdb")
    for split, n in (("train", 24), ("test", 24), ("unsup", 3)):
        folder = data.load_imdb(split, str(imdb_tree))
        packed = data.load_imdb(split, str(tarball))
        assert len(folder) == n
        assert [(r.text, r.label, r.id, r.rating) for r in folder] == [(r.text, r.label, r.id, r.rating) for r in packed]
    train = data.load_imdb("train", str(imdb_tree / "aclImdb"))  # the extracted aclImdb folder itself works too
    assert {r.label for r in train} == {0, 1}
    assert all((r.label == 1) == (r.rating >= 7) for r in train)
    assert {r.label for r in data.load_imdb("unsup", str(imdb_tree))} == {-1}


def test_imdb_path_from_environment(imdb_tree, monkeypatch):
    monkeypatch.setenv("IMDB_PATH", str(imdb_tree))
    assert len(data.load_imdb("test")) == 24


@pytest.mark.parametrize("make, words", [
    (lambda p: p / "nope", ["no such file"]),
    (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", ["not a tar archive"]),
    (lambda p: (p / "empty").mkdir() or p / "empty", ["no test reviews"]),
])
def test_bad_data_paths_are_named(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(DataError) as err:
        data.load_imdb("test", str(path))
    assert str(path) in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_validation_split_is_seeded_stratified_and_disjoint():
    reviews = [Review(f"r{i}", i % 2, i // 2, 1) for i in range(400)]
    train, val = data.train_val_split(reviews, val_fraction=0.05, seed=0)
    assert len(val) == 20 and sum(r.label for r in val) == 10
    assert {r.text for r in train}.isdisjoint(r.text for r in val)
    assert len(train) + len(val) == 400
    assert [r.text for r in data.train_val_split(reviews, 0.05, 0)[1]] == [r.text for r in val]
    assert [r.text for r in data.train_val_split(reviews, 0.05, 1)[1]] != [r.text for r in val]


def test_balanced_subset_is_subset_c_of_the_shared_readme():
    # 12,500 reviews per class, shuffled so that list order differs from id order
    reviews = [Review("", label, i, 1) for label in (0, 1) for i in range(12500)]
    reviews = [reviews[i] for i in np.random.default_rng(5).permutation(len(reviews))]
    subset = data.balanced_subset(reviews, 1000)
    rng = np.random.default_rng(0)  # the recipe written in shared/data/README.md
    pos, neg = rng.choice(12500, 500, replace=False), rng.choice(12500, 500, replace=False)
    assert [(r.label, r.id) for r in subset] == [(1, int(i)) for i in pos] + [(0, int(i)) for i in neg]
    with pytest.raises(DataError, match="--limit 30000"):
        data.balanced_subset(reviews, 30000)


def test_tokens_are_gpt2_without_bos_eos_and_truncated():
    assert data.encode(["Hello world"], 10) == [[15496, 995]]  # tiktoken gpt2, as in shared/tiktoken_cache/README.md
    assert data.encode(["a<br /><br />b"], 10) == data.encode(["a\n\nb"], 10)
    assert len(data.encode(["word " * 100], 16)[0]) == 16
    data.check_vocab(50258, "ok")
    with pytest.raises(DataError, match="vocab_size 64"):
        data.check_vocab(64, "fixture")


def test_collate_and_length_batches():
    x0, attention_mask = data.collate([[1, 2, 3], [4]])
    assert x0.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert attention_mask.tolist() == [[True, True, True], [True, False, False]]
    lengths = list(np.random.default_rng(0).integers(1, 500, 1000))
    for rng in (None, np.random.default_rng(1)):
        batches = data.length_batches(lengths, 16, rng)
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert all(len(b) <= 16 for b in batches)
    spread = np.mean([np.ptp([lengths[i] for i in b]) for b in data.length_batches(lengths, 16, np.random.default_rng(1))])
    assert spread < 0.2 * np.ptp(lengths)  # similar lengths in a batch: little padding


@pytest.mark.parametrize("n, max_len, sizes", [(5, 8, [5]), (8, 8, [8]), (9, 8, [4, 5]), (24, 8, [8, 8, 8]), (25, 8, [6, 6, 6, 7])])
def test_windows_are_the_fewest_disjoint_pieces_that_fit(n, max_len, sizes):
    ids = list(range(100, 100 + n))
    pieces = data.windows(ids, max_len)
    assert [len(p) for p in pieces] == sizes
    assert [i for p in pieces for i in p] == ids  # disjoint, in order, nothing left out


def test_crop_takes_a_seeded_random_window_of_long_texts_only():
    ids = list(range(50))
    g = torch.Generator().manual_seed(0)
    assert data.crop(ids[:8], 8, g) == ids[:8]
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # a short text draws nothing
    starts = {data.crop(ids, 8, g)[0] for _ in range(1000)}
    assert starts == set(range(43))  # every start 0..50-8 is drawn
    window = data.crop(ids, 8, torch.Generator().manual_seed(3))
    assert window == data.crop(ids, 8, torch.Generator().manual_seed(3))  # the same seed, the same window
    assert window == ids[window[0]:window[0] + 8]
