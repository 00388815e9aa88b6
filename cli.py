"""The plumbing that the command-line tools (train.py, classify.py, eval.py) share, and nothing else:
--help that shows defaults, torchrun set-up, one-line failures, a checkpoint's training data as the
default --data, and progress that suits a terminal or a log file. No model or diffusion maths lives here.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from model import PRECISIONS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows every flag's default: each flag that has
    one (not None, False or an empty list) and whose help does not already say it."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def short_description(doc: str, prog: str) -> str:
    """--help's description from a module docstring: its first line and its example commands (the
    indented `python ...` / `torchrun ...` lines); the prose stays in the file, where it is read."""
    lines = doc.strip().splitlines()
    examples = [line for line in lines
                if line.lstrip().startswith(("python ", "torchrun ")) and line.startswith("    ")]
    return "\n".join([lines[0], "", *examples, "",
                      f"How it works: the docstring at the top of {prog}; docs/design.md."])


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line that points to --help (not a usage block),
    a description cut to the module docstring's first line and examples (short_description),
    rarely needed flags in an "advanced" group (advanced_group) that --help leaves out and
    --help-all shows: --help stays a screen long, and no abbreviated flags (allow_abbrev False: a
    mistyped `--max-step 3` is an error, not --max-steps, and a flag added later changes no command)."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=kwargs.pop("formatter_class", HelpFormatter), add_help=False,
                         allow_abbrev=kwargs.pop("allow_abbrev", False), **kwargs)
        if self.description:
            self.description = short_description(self.description, self.prog)
        self.advanced = None
        self.add_argument("-h", "--help", action="help", help="show this help message and exit")
        self.add_argument("--help-all", action=HelpAll, help="show every flag, the advanced ones included, and exit")

    def advanced_group(self, title: str):
        """The argument group of the advanced flags (created once): parsed as any other, listed by
        --help-all only."""
        if self.advanced is None:
            self.advanced = self.add_argument_group(title)
        return self.advanced

    def format_help(self, every_flag: bool = False) -> str:
        hidden = [] if every_flag or self.advanced is None else self.advanced._group_actions
        helps = [a.help for a in hidden]
        for action in hidden:
            action.help = argparse.SUPPRESS  # argparse leaves such a flag out of the usage and the list
        try:
            return super().format_help()
        finally:
            for action, text in zip(hidden, helps):
                action.help = text

    def error(self, message: str):
        hidden = self.advanced and any(flag in message for action in self.advanced._group_actions
                                       for flag in action.option_strings)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} {'--help-all' if hidden else '--help'})\n")


class HelpAll(argparse.Action):
    """--help-all: print the help with every flag, the advanced ones included, and exit (as --help does)."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(parser.format_help(every_flag=True))
        parser.exit()


def fail(message: str, status: int = 1):
    """Exit with a one-line error on stderr (no traceback). Under torchrun every rank meets the same
    error; rank 0 says it."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(message, file=sys.stderr)
    raise SystemExit(status)


def preflight(checks: list, errors: tuple) -> None:
    """Run every check (a callable that raises one of `errors`, whose message names what is missing
    and how to supply it) and exit with one error naming all that failed: a user offline learns
    everything a command needs at once, before any data is loaded."""
    problems = []
    for check in checks:
        try:
            check()
        except errors as e:
            problems.append(str(e))
    if len(problems) == 1:
        fail(f"error: {problems[0]}")
    if problems:
        fail(f"error: {len(problems)} things this command needs are missing: "
             + " | ".join(f"({i}) {m}" for i, m in enumerate(problems, 1)))


def init_distributed() -> tuple[int, int, str]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE set) join the process group: NCCL with
    one GPU per process (LOCAL_RANK), gloo on CPU. A plain `python script.py` is rank 0 of 1.
    Exits with a one-line error when torchrun starts more processes per node than there are GPUs."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, "cuda" if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        local_rank, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local_rank >= gpus:  # NCCL would fail later with a traceback from every process
            fail(f"error: torchrun started process {local_rank} on a machine with {gpus} GPU(s): pass "
                 f"--nproc_per_node={gpus} (one process per GPU), or CUDA_VISIBLE_DEVICES= to run on the CPU")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))  # binds the communicator to this GPU now
    else:
        device = "cpu"
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def add_scoring_args(p: ArgumentParser, mc_samples: int, estimators: tuple,
                     mc_help: str = "K Monte-Carlo draws per text in each round of sequential scoring"):
    """The flags of classify.py and eval.py: which texts to score, and how the NELBO is estimated
    (mc_samples: the default of --mc-samples, mc_help its help: what K is to the tool; estimators:
    scoring.ESTIMATORS, the first the default). Returns the "advanced" argument group, for the
    tool's own rarely needed flags."""
    data.add_data_args(p, from_checkpoint=True)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--test-data", metavar="PATH",
                   help="a separate labeled test set (.jsonl, .csv or class folder): score all of it")
    p.add_argument("--limit", type=data.positive(), metavar="N",
                   help="score a balanced, seeded subset of this many texts (IMDB: 1000 = subset C)")
    p.add_argument("--input", metavar="PATH",
                   help="score your own texts instead: a file with one text per line, a folder of .txt "
                   "files (one text each), or - for stdin")
    p.add_argument("--mc-samples", type=data.positive(), default=mc_samples, metavar="K", help=mc_help)
    advanced = p.advanced_group("advanced (the defaults are the measured ones)")
    advanced.add_argument("--estimator", choices=estimators, default=estimators[0],
                          help="time: t ~ U antithetic, weight 1/t (Eq. 11); "
                          "count: k ~ U{1..n} masked tokens, weight n/k")
    p.add_argument("--batch-size", type=data.positive(), default=16, metavar="N",
                   help="texts per forward pass (as in train.py), each with its K draws; smaller if memory runs out")
    advanced.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                          help="auto: bf16 on CUDA (weights cast once), fp32 on CPU; fp16 for GPUs without bf16")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo draws")
    return advanced


def checkpoint_data(args, paths: list[str]) -> None:
    """Without --data, the data the first checkpoint of `paths` was trained on: sets args.data, and
    args.text_field / args.label_field where they are still their defaults, from the train_args that
    train.py records in its config.json (a --data, --text-field or --label-field given wins). A
    checkpoint that records no data (trained on IMDB, or a hub model) leaves args as they are: IMDB,
    $IMDB_PATH; an unreadable config.json too (loading the checkpoint then says what is wrong).
    Raises data.DataError, naming --data, when the recorded data is no longer there."""
    config = Path(paths[0], "config.json")
    if args.data is not None or not config.is_file():
        return
    try:
        recorded = json.loads(config.read_text(encoding="utf-8")).get("train_args") or {}
    except (ValueError, AttributeError):  # not a config: the checkpoint's loader names what is wrong with it
        return
    if recorded.get("data") is None:
        return
    if not os.path.exists(recorded["data"]):
        raise data.DataError(f"no --data given, and {paths[0]}'s training data {recorded['data']} is not there: "
                             "pass --data")
    args.data = recorded["data"]
    for field, default in (("text_field", "text"), ("label_field", "label")):
        if getattr(args, field) == default:
            setattr(args, field, recorded.get(field, default))
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"--data {args.data} (the training data of {paths[0]})", file=sys.stderr)


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError ("can't allocate memory")."""
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "memory" in text
                                                     and ("allocate" in text or "out of memory" in text))


def run_cli(run, argv, errors: tuple, smaller: str = "--batch-size", interrupted: str = "interrupted"):
    """Call run(argv), turning the failures a user can fix into one-line errors: `errors` (the tool's
    own exception types, whose messages name the file, line, key or flag), running out of memory
    (the message names `smaller`, the flag that sizes a forward pass) and Ctrl-C (`interrupted`,
    exit status 130 as a shell expects). Leaves the torchrun process group in every case."""
    try:
        run(argv)
    except errors as e:
        fail(f"error: {e}")
    except KeyboardInterrupt:
        fail(interrupted, 130)
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(e):
            raise
        first = str(e).strip().splitlines()[0][:160]
        rank = int(os.environ.get("RANK", 0))
        if rank > 0:  # memory runs out on one process, not on all: it says so itself
            print(f"error: rank {rank}: out of memory ({first}); pass a smaller {smaller}", file=sys.stderr)
            raise SystemExit(1)
        fail(f"error: out of memory ({first}); pass a smaller {smaller}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _LogLines:
    """tqdm's interface (update, set_postfix, write, close) for output that is not a terminal: one
    plain line every tenth of the total instead of a bar redrawn with carriage returns."""

    def __init__(self, total: int, desc: str, unit: str, initial: int):
        self.total, self.desc, self.unit, self.n, self.postfix = total, desc, unit, initial, ""
        self.every = max(1, -(-total // 10))  # a tenth, rounded up: at most 10 lines
        self.start, self.next = time.perf_counter(), initial + self.every

    def update(self, n: int = 1):
        self.n += n
        if self.n >= self.next or self.n == self.total:
            self.next = self.n + self.every
            seconds = time.perf_counter() - self.start
            print(f"{self.desc}: {self.unit} {self.n}/{self.total}, {seconds:.0f} s{self.postfix}",
                  file=sys.stderr, flush=True)

    def set_postfix(self, **values):
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())

    def write(self, line: str):
        print(line, flush=True)

    def close(self):
        pass


def progress(total: int, desc: str, unit: str, disable: bool = False, initial: int = 0, leave: bool = True):
    """A progress bar on stderr: tqdm's on a terminal, a line every 10 % otherwise (a log file stays
    readable); nothing when disabled (e.g. ranks > 0)."""
    if not disable and not sys.stderr.isatty():
        return _LogLines(total, desc, unit, initial)
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, initial=initial, leave=leave)
