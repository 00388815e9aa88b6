"""Shared test set-up: import path, offline tokenizer, the reference fixture, a fake aclImdb tree and a toy 3-language dataset."""
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURE = ROOT / "tests" / "fixtures" / "mdlm_tiny"

# Hermetic: what the user's shell exports must not change a result. Variables the code (or torch,
# huggingface_hub, tiktoken) reads are dropped from this process and from every CLI run in a test;
# a test that needs one sets it itself.
USER_VARIABLES = ("HF_HUB_OFFLINE", "HF_HOME", "HF_ENDPOINT", "HF_HUB_CACHE", "HF_TOKEN", "HUGGINGFACE_HUB_CACHE",
                  "TIKTOKEN_CACHE_DIR", "IMDB_PATH", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                  "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PYTHONWARNINGS")
_user_tiktoken = os.environ.get("TIKTOKEN_CACHE_DIR")
for _name in USER_VARIABLES:
    os.environ.pop(_name, None)
# GPT-2 BPE without network: the shared cache beside the checkout (else the user's own cache)
_cache = ROOT.parent / "shared" / "tiktoken_cache"
if _cache.is_dir() or _user_tiktoken:
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_cache) if _cache.is_dir() else _user_tiktoken
os.environ["HF_HOME"] = str(Path(tempfile.gettempdir()) / "mdlm-tests-hf-home")  # a hub cache of the tests' own
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest-xdist's workers: the other has the other core
    import torch
    torch.set_num_threads(1)

def pytest_sessionstart(session):
    """The suite tokenizes with GPT-2's BPE: without it, stop at once with one line that says so (not
    dozens of failures that each say it)."""
    import data
    try:
        data.get_tokenizer()
    except data.DataError as e:
        pytest.exit(f"the tests need the GPT-2 BPE (network once, or ../shared/tiktoken_cache beside the checkout): {e}",
                    returncode=1)


WORDS = {"pos": "great wonderful superb loved brilliant moving".split(),
         "neg": "awful terrible boring hated worst dull".split()}


def make_imdb_tree(root: Path, n: int = 12) -> Path:
    """aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt with n short reviews each, + 3 unsup; returns root."""
    import random
    rng = random.Random(0)
    for split in ("train", "test"):
        for label, ratings in (("pos", (7, 8, 9, 10)), ("neg", (1, 2, 3, 4))):
            folder = root / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                words = " ".join(rng.choice(WORDS[label] + ["the", "film", "was"]) for _ in range(rng.randint(4, 30)))
                (folder / f"{i}_{rng.choice(ratings)}.txt").write_text(f"Review {i}.<br /><br />{words}")
    unsup = root / "aclImdb" / "train" / "unsup"
    unsup.mkdir()
    for i in range(3):
        (unsup / f"{i}_0.txt").write_text("an unlabeled review")
    return root


# three "languages" with disjoint vocabularies (each word one GPT-2 token): a class model only has to
# learn which words its language uses, so a few training steps separate them
LANGUAGES = {"animals": "cat dog horse cow sheep goat pig duck".split(),
             "colors": "red green blue yellow purple orange brown pink".split(),
             "numbers": "one two three four five six seven eight".split()}


def make_languages(n: int, seed: int = 0) -> list[dict]:
    """n texts per language, interleaved: [{"text": 5-15 random words of one language, "label": its name}, ...]."""
    import random
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 15))), "label": label}
            for _ in range(n) for label, words in LANGUAGES.items()]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight a busy machine for its cores)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def imdb_tree(tmp_path):
    return make_imdb_tree(tmp_path / "imdb")


def script_env(extra: dict | None = None) -> dict:
    """The environment the project's CLIs run under in tests: this process's (the user's variables
    dropped, the tests' own hub cache: above), one thread (tiny models run fastest so, and do not
    fight a busy machine), plus `extra` variables."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}


def run_script(script: str, *args, stdin: str | None = None, env: dict | None = None, launcher: tuple = ()):
    """Run one of the project's CLIs in a subprocess, under script_env(env); launcher: arguments
    for python before the script (e.g. "-m", "torch.distributed.run", ...)."""
    import subprocess
    return subprocess.run([sys.executable, *launcher, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, input=stdin, env=script_env(env), timeout=300)
