"""The README's commands, as printed there, at a tiny step count (the main job on a fake aclImdb tree,
the toy languages, the Python API, the other tools), and the source of every number in its Results
table. A README command that stops working, or a number whose command disappears, fails here.
(The GPU section needs CUDA and the hub: it is the one block not run.)"""
import re
import subprocess
import sys

import pytest

from conftest import ROOT, make_imdb_tree, script_env

README = (ROOT / "README.md").read_text()
pytestmark = pytest.mark.usefixtures("one_thread")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def section(title: str) -> str:
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def commands(text: str) -> list[str]:
    """The shell commands of a bash block: comments dropped, continuation lines joined."""
    text = re.sub(r"\\\n\s*", "", text)
    return [line for line in (l.split("  #")[0].strip() for l in text.splitlines()) if line and not line.startswith("#")]


def shell(command: str, cwd, env: dict, timeout: int = 300):
    """A README command, its `python X.py` run as this interpreter on the checkout's X.py."""
    command = re.sub(r"\bpython (\w+\.py)", lambda m: f"{sys.executable} {ROOT / m.group(1)}", command)
    command = re.sub(r"\bpython -", f"{sys.executable} -", command)
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=script_env(env), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"README command failed: {command}\n{result.stderr[-2000:]}"
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    return root, {"IMDB_PATH": str(make_imdb_tree(root / "imdb"))}


def test_the_main_job_runs_as_printed(workdir):
    cwd, env = workdir
    block = next(b for b in blocks("bash") if "--out ckpt/imdb" in b)
    lines = commands(block)
    assert [l.split()[1] for l in lines if l.startswith("python")] == ["train.py", "train.py", "classify.py", "classify.py"]
    for line in lines:
        if "train.py" in line:  # the recipe (train.py's defaults on a CPU: a base, then the label), at a tiny step count
            assert line in ("python train.py --class none --out ckpt/base",
                            "python train.py --class all --init ckpt/base --out ckpt/imdb"), line
            line += " --max-steps 2 --eval-every 1 --val-texts 2"
        out = shell(line, cwd, env)
    assert out.stdout.splitlines()[0].startswith("id\tclass\tposterior")  # the last: --input -
    assert (cwd / "results.json").is_file() and (cwd / "ckpt" / "imdb" / "calibration.json").is_file()
    assert "RESULT_BLOCK" not in README


def test_the_toy_languages_and_the_python_api_run_as_printed(workdir):
    cwd, env = workdir
    toy = next(b for b in blocks("bash") if "langs.jsonl" in b and "EOF" in b)
    shell(toy, cwd, env)  # the whole block, heredoc included
    assert (cwd / "ckpt" / "langs" / "calibration.json").is_file()
    api = blocks("python")[0]
    script = api + "\nassert clf.classes == ['neg', 'pos']\n"  # the last line loads the main job's checkpoint
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + script], cwd=cwd,
                            env=script_env(env), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (cwd / "ckpt" / "langs-py" / "model.safetensors").is_file()


def test_the_other_tools_run_as_printed(workdir):
    cwd, env = workdir
    table = section("Other tools")
    for line in re.findall(r"^\| `(python (?:eval|sample)\.py[^`]*)`", table, re.M):
        shell(line, cwd, env)
    for script in re.findall(r"`(?:torchrun [^`]*?|python )(\w+\.py)", table):
        assert (ROOT / script).is_file(), script


def test_every_results_number_has_its_command():
    table = [row for row in section("Results").splitlines() if row.startswith("| ") and "---" not in row][1:]
    assert len(table) >= 6
    for row in table:
        cells = [c.strip() for c in row.strip("|").split("|")]
        how = cells[-1]
        numbers = re.findall(r"\d+\.\d\d %", cells[1])  # the accuracies (two decimals)
        if "published" in cells[0]:
            assert "paperswithcode" in how  # not measured here: its source named
            continue
        links = re.findall(r"\((docs/[\w.]+\.md)\)", how)
        commands_ = re.findall(r"`(python [^`]+)`", how) + (["the block above"] if "the block above" in how else [])
        assert links or commands_, f"no command or report for: {row}"
        for doc in links:
            text = (ROOT / doc).read_text()
            assert "python " in text, doc  # the report gives its commands
            for number in numbers:
                assert number.replace(" %", "") in text, f"{number} of the README is not in {doc}"
        for command in re.findall(r"`(python \w+\.py[^`]*)`", how):
            script, *flags = command.split()[1:]
            help_text = subprocess.run([sys.executable, ROOT / script, "--help"], capture_output=True, text=True,
                                       env=script_env()).stdout
            if "--help-all" in help_text:  # train.py: the advanced flags are in the full help
                help_text = subprocess.run([sys.executable, ROOT / script, "--help-all"], capture_output=True, text=True,
                                           env=script_env()).stdout
            assert all(f in help_text for f in flags if f.startswith("--")), command


def test_every_flag_of_every_readme_command_exists():
    """A flag removed or renamed in a script but still quoted in the README fails here (each script's
    --help-all, or --help, lists its flags)."""
    quoted = re.findall(r"python (\w+\.py)((?: +(?:--?[\w-]+|[^\s`#|&]+))*)", README)
    helps = {}
    for script, rest in quoted:
        assert (ROOT / script).is_file(), script
        if script not in helps:
            help_text = subprocess.run([sys.executable, ROOT / script, "--help-all"], capture_output=True,
                                       text=True, env=script_env())
            if help_text.returncode:  # a script without advanced flags has --help alone
                help_text = subprocess.run([sys.executable, ROOT / script, "--help"], capture_output=True,
                                           text=True, env=script_env())
            helps[script] = help_text.stdout
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
            assert re.search(rf"{flag}\b", helps[script]), f"README: python {script} ... {flag}: not a flag of {script}"
    assert len(helps) >= 6
