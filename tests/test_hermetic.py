"""The suite passes whatever the user's shell exports (conftest.USER_VARIABLES)."""
import os
import subprocess
import sys

from conftest import ROOT

HOSTILE = {"HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent/hf", "HF_ENDPOINT": "http://127.0.0.1:9",
           "TIKTOKEN_CACHE_DIR": "/nonexistent/tiktoken", "IMDB_PATH": "/nonexistent/imdb.tar.gz",
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "7", "WORLD_SIZE": "4", "RANK": "3"}


def test_tests_that_read_the_environment_pass_under_a_hostile_one():
    """The tests that touch the hub, the tokenizer cache, IMDB_PATH and the CLIs, run in a child
    pytest whose environment holds every variable a user might export, each set to something wrong."""
    tests = ["tests/test_bad_input.py::test_a_repo_the_hub_does_not_have_is_named",
             "tests/test_data.py", "tests/test_newcomer.py::test_a_one_class_dataset_is_warned_about"]  # a CLI: train.py
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env={**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}, **HOSTILE})
    assert result.returncode == 0, result.stdout[-3000:]
