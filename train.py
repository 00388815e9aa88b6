"""Train the MDLMs of a generative classifier: one joint model over (label, text), or one model per class.

    python train.py --class none --out ckpt/base                   # a base of p(text), every text (CPU: 25 min)
    python train.py --class all --init ckpt/base --out ckpt/all    # one model over (label, text), from the base
    python train.py --class all --out ckpt/all                     # from scratch (CPU) or from mdlm-owt-noeos (GPU)
    python train.py --class 0 --init ckpt/base --out ckpt/neg      # one model per class
    python train.py --data my.jsonl --class all --out ckpt/mine    # any labeled dataset (data.py)
    python train.py --class all --init ckpt/base --labeled-limit 500 --out ckpt/few   # 500 labels, the rest unlabeled

--class none trains p(text) alone (no label slot) on every train text, its label dropped, and every
unlabeled text: a base that --init DIR fine-tunes (a joint model gains a fresh label slot, its
other tensors loaded as they are). --class all trains one joint MDLM over (label, text) (model.py,
n_classes = C: a label slot in front of every sequence). A labeled text's slot holds its label and
is masked with the text's move_chance(t), like any token, so the model learns p(label | text) at a
masked slot, p(text | label) under a clamped one, and p(text) under a masked one; an unlabeled text
(IMDB's 50,000 `unsup` reviews; JSONL/CSV rows with an empty label; with --labeled-limit N, every
train text but N) keeps its slot masked and never scores it; --unlabeled (the default with
--labeled-limit) trains on them, half of every micro-batch (MicroBatches).
--disc-weight λ adds the cross-entropy of the true label under the one-pass posterior readout
(step_backward has the formula). A model loaded with --init gets a fresh slot (its text weights
as loaded). Its validation reports the text's NELBO under its own label and with the label
unknown, and the accuracy of both readouts (classify.py: the posterior, and Bayes rule over the
class NELBOs at K = 2).

The model trains on the 'train' split (data.load_dataset; a dataset without splits holds out
its test split first) less a validation set: 5% of each class, seed 0, the same for every run.
A text longer than model_length contributes a random window of model_length tokens each time it
is drawn (data.crop), seeded by the micro-batch index, so a resumed run sees the same windows.

Objective: the masked-token cross-entropy of the forward process (diffusion.train_weight: every
masked token weighted alike, where the NELBO of Eq. 11 weights it 1/t; the 1/t weight kept a CPU-sized
model at the unigram plateau, docs/lm_plateau.md), over (label, text) with --class all
(joint_nelbo), in nats per real token of the whole optimizer step (summed over all its
micro-batches, on all processes, and divided by the step's real tokens, so a token weighs the same
in a short text as in a long one), with antithetic t over each micro-batch; validation reports the
NELBO itself; or (--objective atat) MDLM-ATAT's importance-tilted masking
with a curriculum (atat.py; its estimator trains beside the DiT, validation stays the plain
NELBO). AdamW, linear warmup then a constant lr or (--lr-schedule cosine) a cosine decay to 1 %,
grad-norm clipping at 1, bf16 autocast on CUDA (--precision; model.set_runtime). An EMA of the
weights, started from the *loaded* weights, is what gets validated, saved as model.safetensors and
used by classify.py. Per-class models must be trained with identical flags (only --class differs).

Output folder: config.json (model config + training facts), model.safetensors (EMA weights, HF
layout), train_state.safetensors (raw weights, EMA, the ATAT estimator, AdamW moments and the step:
all that --resume needs, in one file), log.jsonl (training loss and validation NELBO). Every file is
written to a temporary name and renamed, so killing the job at any moment leaves the previous checkpoint
loadable. SIGINT (Ctrl-C) or SIGTERM: finish the step, save, exit (a second Ctrl-C leaves at once).
--resume continues exactly: the data order, windows, t, masks and dropout of micro-batch m depend
only on m and --seed (diffusion.draw_seed), and the lr and the ATAT tilt only on the step and
--max-steps.

Several GPUs (or CPU processes, with gloo): `torchrun --standalone --nproc_per_node=N train.py ...`.
Each optimizer step takes --grad-accum micro-batches of --batch-size texts: a global batch of
batch-size x grad-accum texts, whatever N. --grad-accum defaults to N (one micro-batch per process
per step; with N = 1 the global batch is --batch-size) and must be a multiple of N: process r runs
micro-batches r, r + N, ... of each step, DDP averages the gradients, and only rank 0 logs and
writes checkpoints. So a run on N processes with --grad-accum G follows the trajectory of one
process with --grad-accum G, up to float rounding.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

import atat
import data
import diffusion
from scoring import score_posterior, score_texts
import cli
from cli import ArgumentParser, fail, init_distributed, progress, run_cli
from convert_hf import (CONFIG, DEFAULT_REPO, CheckpointError, atomic_write, load_hf, read_config, resolve,
                        save_checkpoint)
from model import DiT, DiTConfig, PRESETS, PrecisionError, max_adaptive_head, set_runtime
from nblr import NBLR
from ngram import CountsLM

FINETUNE_LR, SCRATCH_LR = 2e-5, 3e-4  # 2e-5: the public mdlm-owt fine-tune; 3e-4: MDLM pre-training (small)
# the CPU recipe (docs/base_model.md): a tiny model, from scratch or from a tiny checkpoint (a base)
CPU_RECIPE = {"preset": "tiny", "lr": 1e-3, "max_steps": 800, "base_steps": 4000}  # base_steps: --class none, 25 min
MAX_STEPS = 1000  # any other start
BASE = "none"  # --class none: a base model of p(text) on every text, labels unread
SCHEDULE_CHOICES = ("constant", "cosine")  # the choices of --lr-schedule, --precision and --objective
PRECISION_CHOICES = ("auto", "fp32", "bf16")
OBJECTIVE_CHOICES = ("mdlm", "atat")
ATAT_HEADS = 4  # the importance estimator's attention heads (MDLM-ATAT's)
ATAT_ESTIMATOR_LR = 1e-3  # its peak lr, whatever --lr (it follows --lr's warmup and schedule)
COSINE_FLOOR = 0.01  # --lr-schedule cosine ends at 1 % of the peak lr (MDLM-ATAT's schedule)
STATE = "train_state.safetensors"
SEEDING = "draw_seed"  # how micro-batch seeds are made (diffusion.draw_seed); recorded so that --resume can tell
BATCHING = "pools"  # how micro-batches are drawn (MicroBatches: labeled and unlabeled texts half and half); the same
# the flags that fix the trajectory: --resume refuses to change them (--max-steps, --eval-every,
# --val-reviews and --data, e.g. a moved file, only change when to stop, what to validate, where to read)
TRAJECTORY = ("cls", "init", "preset", "adaptive_head", "precision", "batch_size", "grad_accum", "lr", "warmup_steps",
              "ema_decay", "seed", "text_field", "label_field", "disc_weight", "unlabeled", "labeled_limit",
              "lr_schedule", "objective", "atat_width", "atat_layers", "atat_phases", "atat_tilt", "atat_estimator_weight")
# what a train state written before these flags ran with (None: not known, not compared; such a
# state trained no ATAT estimator). adaptive_head and precision are stored resolved (the head built,
# the autocast dtype used), not as given.
ADDED_LATER = {"disc_weight": 0.0, "unlabeled": True, "adaptive_head": 0, "precision": None, "lr_schedule": "constant",
               "objective": "mdlm", **dict.fromkeys(("atat_width", "atat_layers", "atat_phases", "atat_tilt",
                                                     "atat_estimator_weight"))}


@dataclasses.dataclass
class TrainConfig:
    """What a training run is given: train.py's flags, by their dest names (parse_args fills it from the
    command line, DiffusionClassifier.fit from its own arguments). check_config refuses a bad value,
    naming it; resolve_config fills the defaults that depend on the machine and the starting weights (None here)."""
    cls: str
    out: str
    data: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    init: str = "auto"
    preset: str | None = None
    max_steps: int | None = None
    batch_size: int = 16
    lr: float | None = None
    labeled_limit: int | None = None
    unlabeled: bool | None = None
    eval_every: int = 250
    val_texts: int = 64
    seed: int = 0
    resume: bool = False
    disc_weight: float = 10.0
    adaptive_head: int | None = None
    grad_accum: int | None = None
    warmup_steps: int | None = None
    lr_schedule: str = "constant"
    ema_decay: float = 0.9999
    precision: str = "auto"
    objective: str = "mdlm"
    atat_width: int = 64
    atat_layers: int = 2
    atat_phases: list = dataclasses.field(default_factory=lambda: [0.3, 0.7])
    atat_tilt: float = 0.5
    atat_estimator_weight: float = 1.0


DEFAULTS = TrainConfig(cls="", out="")


class ConfigError(ValueError):
    """A TrainConfig value refused: .name is the field (train.py's flag --name with '-' for '_')."""
    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def check_config(cfg: TrainConfig) -> None:
    """Refuse what cannot train, before any data is read. Raises ConfigError naming the field."""
    positive = ("max_steps", "batch_size", "lr", "labeled_limit", "eval_every", "val_texts", "grad_accum",
                "atat_width", "atat_layers")
    for name in positive:  # argparse's types check these on the command line; fit's arguments arrive unchecked
        value = getattr(cfg, name)
        if value is not None and not 0 < value < float("inf"):
            raise ConfigError(name, f"must be > 0, got {value}")
    choices = {"preset": PRESETS, "lr_schedule": SCHEDULE_CHOICES, "precision": PRECISION_CHOICES,
               "objective": OBJECTIVE_CHOICES}
    for name, allowed in choices.items():
        if getattr(cfg, name) is not None and getattr(cfg, name) not in allowed:
            raise ConfigError(name, f"expected one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    for name in ("preset", "adaptive_head"):  # a model size asks for scratch (init auto becomes scratch)
        if getattr(cfg, name) is not None and cfg.init not in ("auto", "scratch"):
            raise ConfigError(name, "applies to --init scratch only (a loaded checkpoint brings its own config)")
    vocab = DiTConfig().vocab_size  # GPT-2's tokens and the mask (data.check_vocab)
    if cfg.adaptive_head is not None and not 0 <= cfg.adaptive_head <= max_adaptive_head(vocab):
        raise ConfigError("adaptive_head", f"must be 0 (full head) or 1..{max_adaptive_head(vocab)} (4 S below the "
                          f"{vocab - 1:,} tokens), got {cfg.adaptive_head}")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise ConfigError("warmup_steps", f"must be >= 0, got {cfg.warmup_steps}")
    if not 0 <= cfg.ema_decay < 1:
        raise ConfigError("ema_decay", f"must be in [0, 1), got {cfg.ema_decay}")
    for name in ("disc_weight", "atat_estimator_weight"):
        if not getattr(cfg, name) >= 0:
            raise ConfigError(name, f"must be >= 0, got {getattr(cfg, name)}")
    if cfg.cls == BASE and cfg.labeled_limit:
        raise ConfigError("labeled_limit", "applies to --class all or a class model; "
                          "--class none trains on every text, labels unread")
    if cfg.cls != "all" and cfg.unlabeled:
        raise ConfigError("unlabeled", "applies to --class all (one joint model over (label, text)); " + (
            "--class none trains on every text, unlabeled ones included" if cfg.cls == BASE
            else "a class model trains on its own class's labeled texts"))
    if uses_unlabeled(cfg) and cfg.batch_size < 2:
        raise ConfigError("batch_size", "1, but labeled and unlabeled texts share every micro-batch half and half "
                          "(--unlabeled); pass 2 or more")
    if cfg.objective == "atat" and cfg.cls == "all":
        raise ConfigError("objective", "atat applies to one model per class (--class N); "
                          "--class all trains the NELBO of (label, text)")
    if not 0 <= cfg.atat_phases[0] <= cfg.atat_phases[1] <= 1:
        raise ConfigError("atat_phases", f"expected 0 <= EASY_END <= HARD_START <= 1, got {cfg.atat_phases}")
    if not 0 <= cfg.atat_tilt < 1:  # at 1 a row's extreme token would never be masked (weight 1/p unbounded)
        raise ConfigError("atat_tilt", f"must be in [0, 1), got {cfg.atat_tilt}")
    if cfg.atat_width % ATAT_HEADS:
        raise ConfigError("atat_width", f"must be a multiple of the estimator's {ATAT_HEADS} attention heads, "
                          f"got {cfg.atat_width}")


def uses_unlabeled(cfg: TrainConfig) -> bool:
    """--unlabeled as given, or its default: on with --labeled-limit, else off."""
    return cfg.labeled_limit is not None if cfg.unlabeled is None else cfg.unlabeled


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill, in place, the defaults left None: --init auto (hf on a GPU, scratch without), the preset,
    --unlabeled, the lr, --max-steps and the warmup (CPU_RECIPE for a tiny model). Stored resolved:
    --resume compares what ran. Says its choices on stderr (rank 0, not on --resume). Returns cfg."""
    rank0 = int(os.environ.get("RANK", 0)) == 0
    talk = rank0 and not cfg.resume
    if cfg.init == "auto":
        sized = cfg.preset is not None or cfg.adaptive_head is not None  # a model size asks for scratch
        cfg.init = "hf" if torch.cuda.is_available() and not sized else "scratch"
        if talk and not sized:
            said = (f"a GPU is here: fine-tuning {DEFAULT_REPO}" if cfg.init == "hf"
                    else "no GPU here: the CPU recipe from scratch")
            print(f"--init auto: {said} (--init hf|scratch|DIR chooses)", file=sys.stderr)
            talk = False  # one line: the preset below goes without saying
    if cfg.init == "scratch" and cfg.preset is None:
        cfg.preset = "small" if torch.cuda.is_available() else "tiny"
        if talk:
            size = "169.6M parameters, on the GPU" if cfg.preset == "small" else "8.2M parameters: no GPU here"
            print(f"--init scratch: the {cfg.preset} preset ({size}; --preset small|tiny chooses)", file=sys.stderr)
    cfg.unlabeled = uses_unlabeled(cfg)
    recipe = cfg.preset == CPU_RECIPE["preset"] if cfg.init == "scratch" else tiny_checkpoint(cfg.init)
    cfg.lr = cfg.lr or (CPU_RECIPE["lr"] if recipe else SCRATCH_LR if cfg.init == "scratch" else FINETUNE_LR)
    cfg.max_steps = cfg.max_steps or (CPU_RECIPE["base_steps" if cfg.cls == BASE else "max_steps"] if recipe
                                      else MAX_STEPS)
    if cfg.warmup_steps is None:
        cfg.warmup_steps = min(100, cfg.max_steps // 8)
    elif cfg.warmup_steps > cfg.max_steps and rank0:
        print(f"warning: --warmup-steps {cfg.warmup_steps} is longer than --max-steps {cfg.max_steps}: the lr ends at "
              f"{cfg.max_steps}/{cfg.warmup_steps} of --lr {cfg.lr} (pass a shorter --warmup-steps)", file=sys.stderr)
    return cfg


def parse_args(argv=None) -> TrainConfig:
    """train.py's command line -> a checked, resolved TrainConfig (a bad flag: a one-line usage error).
    --help lists the common flags; --help-all the advanced ones too (their defaults: the measured recipe's)."""
    p = ArgumentParser(description=__doc__, usage="%(prog)s --class C --out DIR [options]   (--help-all: every flag)")
    p.add_argument("--class", dest="cls", required=True, metavar="C",
                   help="a class name or index: one model per class (IMDB: neg = 0, pos = 1); 'all': one joint model "
                        "over (label, text); 'none': a base of p(text), labels unread")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder")
    p.add_argument("--init", default=DEFAULTS.init, metavar="FROM",
                   help=f"'hf' ({DEFAULT_REPO}), 'scratch', or a checkpoint folder / hub id; auto: hf on a GPU, "
                        "scratch (the CPU recipe) without one")
    data.add_data_args(p)
    p.add_argument("--labeled-limit", type=data.positive(), metavar="N",
                   help="few labels: keep N labeled train texts, N / C per class (drawn with --seed); --class all "
                        "reads the rest as unlabeled texts, a class model keeps its N / C")
    p.add_argument("--max-steps", type=data.positive(), metavar="N",
                   help=f"optimizer steps (default: {CPU_RECIPE['base_steps']} for a tiny base, "
                        f"{CPU_RECIPE['max_steps']} for any other tiny model, else {MAX_STEPS})")
    p.add_argument("--lr", type=data.positive(float), help=f"peak lr (default: {CPU_RECIPE['lr']:g} tiny, "
                   f"{SCRATCH_LR:g} small from scratch, {FINETUNE_LR:g} fine-tuning hf)")
    p.add_argument("--batch-size", type=data.positive(), default=DEFAULTS.batch_size, metavar="N",
                   help="texts per micro-batch")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help="seed of the data order, the masks and the labels kept")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    advanced = p.advanced_group("advanced (the defaults are the measured recipe's)").add_argument
    advanced("--preset", choices=PRESETS,
             help="model size for --init scratch (default: small on a GPU, tiny without one)")
    advanced("--unlabeled", action=argparse.BooleanOptionalAction,
             help="--class all: also train on the unlabeled texts (the data's unlabeled rows, IMDB's unsup split, and "
                  "with --labeled-limit the train texts whose labels it drops), label slot masked, half of every "
                  "micro-batch (default: on with --labeled-limit, else off: with every label they cost labeled steps "
                  "and accuracy, docs/label_token.md)")
    advanced("--eval-every", type=data.positive(), default=DEFAULTS.eval_every,
             help="validate and checkpoint every N steps")
    advanced("--val-texts", "--val-reviews", dest="val_texts", type=data.positive(), default=DEFAULTS.val_texts,
             help="held-out texts per class used for validation (64: a few steps' worth of compute per validation)")
    advanced("--disc-weight", type=float, default=DEFAULTS.disc_weight, metavar="λ",
             help="--class all: weight of the label's cross-entropy under the one-pass posterior readout, added to "
                  "the NELBO (0: purely generative)")
    advanced("--adaptive-head", type=int, metavar="S",
             help="--init scratch: adaptive-softmax output head with the S most frequent tokens in its head, 0 = a "
                  "full linear head (default: the preset's)")
    advanced("--grad-accum", type=data.positive(),
             help="micro-batches per optimizer step, over all processes (global batch = batch-size x grad-accum texts; "
                  "None: one per process)")
    advanced("--warmup-steps", type=int,
             help="linear warmup steps (0: none; default 100, or an eighth of --max-steps when that is shorter)")
    advanced("--lr-schedule", choices=SCHEDULE_CHOICES, default=DEFAULTS.lr_schedule,
             help=f"after warmup: constant, or cosine decay to {COSINE_FLOOR:g} x --lr at --max-steps")
    advanced("--ema-decay", type=float, default=DEFAULTS.ema_decay,
             help="decay of the EMA of the weights that is saved")
    advanced("--precision", choices=PRECISION_CHOICES, default=DEFAULTS.precision,
             help="autocast of the blocks and output layer: auto = bf16 on CUDA (as the reference), fp32 on CPU; a GPU "
                  "without bf16 needs fp32 (fp16 training would need loss scaling)")
    advanced("--objective", choices=OBJECTIVE_CHOICES, default=DEFAULTS.objective,
             help="mdlm: the NELBO of Eq. 11; atat: MDLM-ATAT's importance-tilted masking with a curriculum (atat.py)")
    advanced("--atat-width", type=data.positive(), default=DEFAULTS.atat_width,
             help="--objective atat: the importance estimator's width")
    advanced("--atat-layers", type=data.positive(), default=DEFAULTS.atat_layers,
             help="--objective atat: its transformer layers")
    advanced("--atat-phases", type=float, nargs=2, default=DEFAULTS.atat_phases, metavar=("EASY_END", "HARD_START"),
             help="--objective atat: the curriculum masks easy tokens more before EASY_END x --max-steps, hard ones "
                  "more after HARD_START x --max-steps, and moves between the two in the middle")
    advanced("--atat-tilt", type=float, default=DEFAULTS.atat_tilt,
             help="--objective atat: the curriculum's largest tilt of the masking rates, in [0, 1) (0: plain masking)")
    advanced("--atat-estimator-weight", type=float, default=DEFAULTS.atat_estimator_weight,
             help="--objective atat: weight of the estimator's regression loss (its gradient never reaches the DiT)")
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    try:
        check_config(cfg)
    except ConfigError as e:
        p.error(f"argument --{e.name.replace('_', '-')}: {e}")
    return resolve_config(cfg)


def tiny_checkpoint(init: str) -> bool:
    """Whether --init names a local checkpoint folder of the tiny preset's size (a base trained here):
    it fine-tunes with the CPU recipe's lr and steps, not the 169.6M hub model's."""
    try:
        cfg = read_config(Path(init))[0]
    except CheckpointError:  # a hub id, or a folder load_hf will name the problem of
        return False
    tiny = PRESETS[CPU_RECIPE["preset"]]
    return (cfg.hidden_dim, cfg.n_blocks, cfg.model_length) == (tiny.hidden_dim, tiny.n_blocks, tiny.model_length)


def class_index(name: str, classes: list[str]) -> int | None:
    """--class NAME_OR_INDEX -> index into classes (a name first, then a number); 'all' (and BASE,
    'none', which reads no label) -> None. Raises DataError for anything else."""
    if name in ("all", BASE):
        return None
    if name in classes:
        return classes.index(name)
    if name.isdigit() and int(name) < len(classes):
        return int(name)
    raise data.DataError(f"--class {name}: expected one of {', '.join(classes)}, "
                         f"an index 0..{len(classes) - 1}, or all")


def training_texts(args, reviews: list[data.Review], cls: int | None,
                   unsup: list[data.Review] | None = None) -> tuple[list[data.Review], list[data.Review]]:
    """(train, val) from the train split's labeled texts: val is 5 % of each class (data.train_val_split,
    seed 0: the same held-out set for every run); train is the rest, of class cls only (a class model:
    with --labeled-limit N, its share of the N labels a joint model gets with that --seed),
    or (cls None) its --labeled-limit labeled texts (data.labeled_limit with --seed), then, with
    --unlabeled, the texts whose labels that drops and the unlabeled texts (data.UNLABELED): `unsup`, or
    (None) the data's unlabeled rows (data.load_dataset's 'unsup' split). --class none (a base): every
    train text with its label dropped, then the unlabeled texts; never a val or test text."""
    train, val = data.train_val_split(reviews)
    if cls is not None:  # with --labeled-limit N: its N / C texts of the class (the joint model's N labels, same seed)
        train = data.labeled_limit(train, args.labeled_limit, args.seed)[0] if args.labeled_limit else train
        return [r for r in train if r.label == cls], val
    dropped = []
    if args.cls == BASE:  # every label dropped: the whole train part joins the unlabeled pool
        train, dropped = [], [dataclasses.replace(r, label=data.UNLABELED) for r in train]
    elif args.labeled_limit:
        train, dropped = data.labeled_limit(train, args.labeled_limit, args.seed)
    if args.unlabeled or args.cls == BASE:
        unsup = data.load_dataset(args.data, "unsup", args.text_field, args.label_field)[0] if unsup is None else unsup
        train = train + dropped + unsup
    return train, val


def ngram_texts(args, reviews: list[data.Review]) -> list[data.Review]:
    """The labeled texts the n-gram component (nblr.py) is fitted on: every class's texts that a joint
    model with these flags trains on (the train part of data.train_val_split, cut to --labeled-limit's
    draw with --seed), also for a class model, whose copy must match its siblings'; never a val or test text."""
    train = data.train_val_split(reviews)[0]
    if args.labeled_limit:
        train = data.labeled_limit(train, args.labeled_limit, args.seed)[0]
    return [r for r in train if r.label != data.UNLABELED]


def fit_ngram(args, reviews: list[data.Review], classes: list[str], val: list[data.Review]) -> None:
    """Fit NB-LR (nblr.NBLR) on ngram_texts and save it in --out beside the MDLM; a --resume that
    finds it there keeps it; labels of fewer than two classes fit none. Prints its size, time and
    accuracy on the held-out val texts."""
    texts = ngram_texts(args, reviews)
    if len({r.label for r in texts}) < 2 or args.resume and NBLR.load(args.out, classes) is not None:
        return  # no two classes to tell apart, or --resume keeps the one it finds
    start = time.perf_counter()
    ngram = NBLR.fit([r.text for r in texts], [r.label for r in texts], classes)
    seconds = time.perf_counter() - start
    ngram.save(args.out)
    accuracy = np.mean(ngram.log_proba([r.text for r in val]).argmax(1) == [r.label for r in val])
    print(f"n-gram component: NB-LR on {len(texts)} labeled texts, {len(ngram.vocabulary)} word uni+bigrams, "
          f"{seconds:.0f} s; val accuracy {accuracy:.4f} on {len(val)} held-out texts (saved in {args.out})")


def frequency_rank(tokens: list[list[int]], n_tokens: int) -> torch.Tensor:
    """Each token id's rank by its count in `tokens` (0 = the most frequent; ties by id): long
    [n_tokens], a permutation of 0..n_tokens-1. The adaptive head puts low ranks in its head cluster."""
    counts = np.bincount(np.concatenate([np.asarray(ids, dtype=np.int64) for ids in tokens]),
                         minlength=n_tokens)[:n_tokens]
    order = np.argsort(-counts, kind="stable")
    rank = np.empty(n_tokens, dtype=np.int64)
    rank[order] = np.arange(n_tokens)
    return torch.from_numpy(rank)


def init_model(args, n_classes: int, tokens: list[list[int]]) -> DiT:
    """The starting weights: a fresh preset, or a loaded checkpoint. n_classes > 0 (--class all): a
    joint model over (label, text); an unconditional checkpoint keeps every loaded tensor and gets a
    fresh label slot (model.py: its embedding drawn, its head zero, so it starts uniform over labels).
    A fresh adaptive head ranks the tokens by their frequency in `tokens` (the training texts).
    Raises CheckpointError for a conditional checkpoint with another number of classes (or any,
    for a class model)."""
    torch.manual_seed(args.seed)
    if args.init == "scratch":
        cfg = PRESETS[args.preset or "small"]
        cfg = dataclasses.replace(cfg, n_classes=n_classes,
                                  adaptive_head=cfg.adaptive_head if args.adaptive_head is None else args.adaptive_head)
        model = DiT(cfg)
        if cfg.adaptive_head:
            model.output_layer.token_rank.copy_(frequency_rank(tokens, cfg.vocab_size - 1))
        return model
    model = load_hf(DEFAULT_REPO if args.init == "hf" else args.init)
    if model.config.n_classes == n_classes:
        return model
    if model.config.n_classes:
        want = f"the data has {n_classes}" if n_classes else "a class model (--class N) is unconditional"
        raise CheckpointError(f"--init {args.init}: conditional on {model.config.n_classes} classes, but {want}")
    conditional = DiT(dataclasses.replace(model.config, n_classes=n_classes))
    fresh = {k: v for k, v in conditional.state_dict().items() if k.startswith("label_")}
    conditional.load_state_dict({**model.state_dict(), **fresh}, strict=True)  # every loaded tensor, plus the slot
    if int(os.environ.get("RANK", 0)) == 0 and not getattr(args, "resume", False):  # said once, not on --resume
        print(f"--init {args.init}: unconditional; every tensor loaded, plus a fresh label slot for {n_classes} "
              f"classes: {', '.join(sorted(fresh))}", file=sys.stderr)
    return conditional.eval()


@dataclasses.dataclass
class MicroBatch:
    """One micro-batch of a training step, on the device: the seed of its dropout, then the forward
    process's draws. x0: long [B, L]; attention_mask: bool [B, L] or None (no padding); t: float [B];
    u: float [B, L], the uniforms that mask a token where u < its masking rate (diffusion.mask_positions);
    labels: long [B] (0..C-1, C = unlabeled) or None (a model without a label slot); slot_u: float [B],
    the label slot's uniform (masked where slot_u < move_chance(t)), or None."""
    seed: int
    x0: torch.Tensor
    attention_mask: torch.Tensor | None
    t: torch.Tensor
    u: torch.Tensor
    labels: torch.Tensor | None = None
    slot_u: torch.Tensor | None = None


@dataclasses.dataclass
class AtatStep:
    """What --objective atat adds to a training step (atat.py): the importance estimator (DDP-wrapped
    under torchrun), this step's curriculum tilt, and the weight of the estimator's regression loss."""
    estimator: torch.nn.Module
    tilt: float
    weight: float


def joint_loss(model, part: MicroBatch, step_tokens: int, disc_weight: float,
               step_labeled: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One micro-batch of a joint model: (its denoising nats per step token, the loss to differentiate,
    {"disc_loss": the unweighted label term, detached} when λ > 0); step_backward has the formula."""
    x0, t, labels = part.x0, part.t, part.labels
    labeled = labels < model.config.n_classes
    masked = diffusion.mask_positions(t, part.attention_mask, u=part.u)
    slot_masked = part.slot_u < diffusion.move_chance(t)
    out = diffusion.joint_nelbo(model, x0, t, masked, part.attention_mask, labels, slot_masked,
                                readout=labeled if disc_weight > 0 else None, weight=diffusion.train_weight(t))
    if disc_weight == 0:  # the purely generative step: no clean pass
        nats = out.sum() / step_tokens
        return nats, nats, {}
    out, clean = out
    nats = out.sum() / step_tokens
    disc = -clean.gather(1, labels[labeled][:, None]).sum() / max(step_labeled, 1)  # the labeled texts' readout
    return nats, nats + disc_weight * disc, {"disc_loss": disc.detach().double()}


def text_loss(model, part: MicroBatch, step_tokens: int, atat_step: AtatStep | None,
              n_micro: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One micro-batch of a model without a label slot: (its nats per step token, the loss to differentiate,
    {"estimator_loss"} with --objective atat)."""
    x0, t, attention_mask = part.x0, part.t, part.attention_mask
    if atat_step is None:
        masked = diffusion.mask_positions(t, attention_mask, u=part.u)
        nll = diffusion.token_nll(model, x0, masked, diffusion.model_sigma(model, t), attention_mask)
        nats = diffusion.weighted_sum(nll, masked, diffusion.train_weight(t)[:, None]).sum() / step_tokens
        return nats, nats, {}
    scores = atat_step.estimator(x0, attention_mask)
    masked, p = atat.mask_with_scores(t, scores, attention_mask, atat_step.tilt, part.u)
    nll = diffusion.token_nll(model, x0, masked, diffusion.model_sigma(model, t), attention_mask)
    nats = diffusion.weighted_sum(nll, masked, atat.token_weights(t, p)).sum() / step_tokens
    target = atat.difficulty_target(nll.detach(), model.config.vocab_size)
    est = atat.estimator_loss(scores, target, masked) / n_micro
    return nats, nats + atat_step.weight * est, {"estimator_loss": est.detach().double()}


def step_backward(model, parts: list, step_tokens: int, world: int = 1, atat_step: AtatStep | None = None,
                  disc_weight: float = 0.0, step_labeled: int = 0) -> tuple[torch.Tensor, dict]:
    """Forward and backward of this process's micro-batches of one optimizer step.

    parts: this process's MicroBatches; step_tokens: the real tokens of the whole step, over all
    micro-batches and processes. The gradient is that of sum(loss) / step_tokens, nats per real token of the step
    (times world: DDP averages the processes' gradients, and the step's loss is their sum).
    Gradients are all-reduced once, on the last micro-batch.

    A model with a label slot (parts carry labels; joint_loss) trains the objective

        L = sum_i D(y_i, x_i) / step_tokens  +  λ * sum_{i labeled} -log p_theta(y_i | x_i) / step_labeled

    (λ = disc_weight; step_labeled: the step's labeled texts). D, the denoising loss of (label, text)
    (diffusion.joint_nelbo with diffusion.train_weight: the NELBO's terms with the masked tokens
    weighted alike instead of by 1/t; its minimiser is the NELBO's). The second term is the mean
    cross-entropy of the true label under the posterior readout (a masked slot, the text clean:
    exactly what classify.py reads, diffusion.label_posterior). The first term alone is a
    maximum-likelihood fit of the joint p(y, x); the second is the conditional likelihood of the
    labels, the discriminative objective (a hybrid generative-discriminative fit, e.g. Bouchard &
    Triggs 2004, Lasserre et al. 2006). λ = 0 skips the clean pass entirely (the purely generative step).

    Without a slot (text_loss) a token is masked where u < move_chance(t) (the plain forward process)
    and weighted by train_weight. With atat_step, the estimator scores x0 and atat.mask_with_scores
    masks from the same u with the step's tilt, each masked token is weighted by atat.token_weights
    (= the NELBO's 1/t at tilt 0; not an unbiased NELBO otherwise, see atat.py), and weight x
    atat.estimator_loss (per micro-batch, averaged over the step's micro-batches) trains the
    estimator on the detached per-token losses.

    Returns (this process's share of the step's first term, nats per text token, its slot terms
    included: validation's val_nats_per_token is the text's NELBO alone, the slot clamped; {name:
    this process's share of each other term, unweighted}: "disc_loss" (λ > 0), "estimator_loss"
    (ATAT)), float64 scalar tensors (no host sync).
    """
    loss, extra = torch.zeros((), dtype=torch.float64, device=parts[0].x0.device), {}
    for j, part in enumerate(parts):
        torch.manual_seed(part.seed)  # dropout: a micro-batch's randomness depends on it alone, not on the process
        last = world == 1 or j == len(parts) - 1
        with nullcontext() if last else model.no_sync(), \
                nullcontext() if last or atat_step is None else atat_step.estimator.no_sync():
            if part.labels is not None:
                nats, total, more = joint_loss(model, part, step_tokens, disc_weight, step_labeled)
            else:
                nats, total, more = text_loss(model, part, step_tokens, atat_step, len(parts) * world)
            (total * world).backward()
        loss += nats.detach()
        for k, v in more.items():
            extra[k] = v + extra.get(k, 0.0)
    return loss, extra


class MicroBatches:
    """Which texts micro-batch m holds: MicroBatches(...)(m) -> list of indices into the training texts.

    Batches group texts of similar length (data.length_batches), reshuffled every epoch, so what m
    holds depends only on m and the seed (a resumed run sees the same batches). With labeled and
    unlabeled texts together (unlabeled: bool [N]), each micro-batch is ceil(B / 2) labeled texts and
    floor(B / 2) unlabeled ones, each pool in its own epochs: a few hundred labels among 75,000
    unlabeled texts still reach every step's discriminative term. Otherwise batches of B from one
    pool, seeded as before the pools existed."""

    def __init__(self, lengths: list[int], unlabeled: np.ndarray, batch_size: int, seed: int):
        if unlabeled.any() and not unlabeled.all():
            self.pools = [(np.flatnonzero(~unlabeled), batch_size - batch_size // 2, 1),
                          (np.flatnonzero(unlabeled), batch_size // 2, 2)]
        else:
            self.pools = [(np.arange(len(lengths)), batch_size, None)]
        self.lengths, self.seed, self.epochs = lengths, seed, {}  # pool -> (epoch, its batches)

    def __call__(self, m: int) -> list[int]:
        batch = []
        for p, (members, size, stream) in enumerate(self.pools):
            n_batches = -(-len(members) // size)
            epoch = m // n_batches
            if self.epochs.get(p, (None,))[0] != epoch:
                rng = np.random.default_rng([self.seed, epoch] + ([] if stream is None else [stream]))
                self.epochs[p] = epoch, data.length_batches([self.lengths[i] for i in members], size, rng)
            batch += [int(members[i]) for i in self.epochs[p][1][m % n_batches]]
        return batch


def lr_at(step: int, args) -> float:
    """The lr of optimizer step `step` (from 0): linear warmup over --warmup-steps, then constant,
    or (--lr-schedule cosine) a cosine decay from --lr to COSINE_FLOOR x --lr at --max-steps."""
    if step < args.warmup_steps or args.lr_schedule == "constant":
        return args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
    progress = (step - args.warmup_steps) / max(args.max_steps - args.warmup_steps, 1)
    return args.lr * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def ema_update(ema: DiT, model: DiT, step: int, decay: float) -> None:
    """ema = d * ema + (1 - d) * model, with d = min(decay, (1 + step) / (10 + step)) so that
    short runs are not dominated by the starting weights."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)


def save(args, model, ema, opt, step, meta, estimator=None):
    """train_state.safetensors first (one file, so it is always a whole state), then the EMA export.
    The ATAT importance estimator (and its AdamW moments) is in the train state only."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    state.update({f"estimator.{k}": v for k, v in ({} if estimator is None else estimator.state_dict()).items()})
    for i, p in enumerate(p for group in opt.param_groups for p in group["params"]):  # the DiT's, then the estimator's
        for k, v in opt.state.get(p, {}).items():
            if k != "step":  # the step count is `step`
                state[f"adam.{i}.{k}"] = v
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"step": str(step), "train_args": json.dumps(meta["train_args"]), "seeding": SEEDING,
                "batching": BATCHING}
    atomic_write(out / STATE,
                 lambda p: save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, p, metadata))
    save_checkpoint(ema.state_dict(), ema.config, out, {**meta, "step": step})


def resume(args, model, ema, opt, estimator=None) -> int:
    """Restore raw weights, EMA, the ATAT estimator and AdamW moments from --out/train_state.safetensors;
    returns its step. Raises CheckpointError if the file is missing or unreadable, does not fit the
    model, or was written with other TRAJECTORY flags (or another --max-steps, when the lr schedule
    or the curriculum is laid out over it)."""
    path = Path(args.out, STATE)
    if not path.is_file():
        raise CheckpointError(f"--resume: {path} not found (nothing to resume; leave out --resume to start)")
    try:
        with safe_open(path, "pt") as f:
            meta, state = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        saved = json.loads(meta["train_args"])
        step, seeding, batching = int(meta["step"]), meta.get("seeding"), meta.get("batching")
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable train state ({type(e).__name__}: {e})") from None
    saved = {**ADDED_LATER, **saved}
    if saved.get("init") == "scratch" and saved.get("preset") is None:  # written before the preset was stored resolved
        saved["preset"] = "small"
    unknown = [k for k, v in ADDED_LATER.items() if v is None and saved.get(k) is None]  # an old state did not say
    if args.objective != "atat":  # the estimator's flags do not touch a plain run
        unknown += [k for k in TRAJECTORY if k.startswith("atat_")]
    if args.cls != "all":  # nor do the joint model's a class model
        unknown += ["disc_weight", "unlabeled"]
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} (now {getattr(args, k)})" for k in TRAJECTORY
               if k not in unknown and saved.get(k) != getattr(args, k)]
    if (args.lr_schedule == "cosine" or args.objective == "atat") and saved.get("max_steps") != args.max_steps:
        changed.append(f"--max-steps {saved.get('max_steps')} (now {args.max_steps}; the cosine lr and the ATAT "
                       "curriculum are laid out over it)")
    if changed:
        raise CheckpointError(f"--resume: {path} was trained with " + ", ".join(changed)
                              + "; these flags must not change")
    try:
        model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")}, strict=True)
        ema.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")}, strict=True)
        if estimator is not None:
            estimator.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("estimator.")}, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit the model ({str(e).splitlines()[0]})") from None
    moments = {i: {"step": torch.tensor(float(step)), "exp_avg": state[f"adam.{i}.exp_avg"],
                    "exp_avg_sq": state[f"adam.{i}.exp_avg_sq"]}
               for i in range(sum(len(group["params"]) for group in opt.param_groups)) if f"adam.{i}.exp_avg" in state}
    # through the optimizer's own loader: it places and casts the moments
    # as its implementation (fused, capturable) needs
    opt.load_state_dict({"state": moments, "param_groups": opt.state_dict()["param_groups"]})
    if seeding != SEEDING and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: {path} was written before diffusion.draw_seed: it continues with other windows, "
              "masks and dropout than its first run would have had", file=sys.stderr)
    if (saved.get("unlabeled") and saved.get("cls") == "all" and batching != BATCHING
            and int(os.environ.get("RANK", 0)) == 0):
        print(f"warning: {path} was written before labeled and unlabeled texts shared every micro-batch half and half: "
              "it continues with other batches than its first run had", file=sys.stderr)
    return step


def cut_log(path: Path, step: int) -> None:
    """Keep the log records of steps <= step: what came after the checkpoint (before a kill) is redone."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            if json.loads(line)["step"] <= step:
                records.append(line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            pass
    atomic_write(path, lambda p: p.write_text("".join(records)))


@dataclasses.dataclass
class Run:
    """What a training run holds between its steps (set_up makes it). tokens: the training texts'
    GPT-2 ids; text_labels: long [N], each text's label (n_classes for an unlabeled one); val_tokens
    and val_labels: the held-out texts validate scores; ddp / est_ddp: the DiT and the ATAT
    estimator as the step runs them (DDP-wrapped under torchrun, else the modules themselves)."""
    args: TrainConfig
    rank: int
    world: int
    device: str
    model: DiT
    ema: DiT
    opt: torch.optim.Optimizer
    estimator: torch.nn.Module | None
    ddp: torch.nn.Module
    est_ddp: torch.nn.Module | None
    tokens: list
    text_labels: torch.Tensor
    n_classes: int
    classes: list
    val_tokens: list
    val_labels: np.ndarray
    prior: list | None
    meta: dict
    batches: MicroBatches
    step: int = 0
    last_saved: int | None = None
    tokens_seen: int = 0
    train_seconds: float = 0.0
    reference: dict = dataclasses.field(default_factory=dict)  # the counts models' nats/token on the val texts

    def intact(self) -> str:
        return (f"the last checkpoint in {self.args.out} (step {self.last_saved}) is intact"
                if self.last_saved is not None else "no checkpoint was written")


def set_up(args, texts: tuple[list, list, list] | None = None) -> Run:
    """Processes, data, model, EMA, optimizer, and --resume's state: a Run at its first step to take.
    texts: (labeled reviews, class names, unlabeled reviews) to train on (DiffusionClassifier.fit),
    else --data's train and unsup splits."""
    rank, world, device = init_distributed()
    args.grad_accum = args.grad_accum or world  # stored resolved: --resume compares what ran
    if args.grad_accum % world:
        fail(f"error: --grad-accum {args.grad_accum}: must be a multiple of the {world} processes "
             f"(each runs grad-accum / {world} micro-batches per step)")
    reviews, classes, unsup = texts or (*data.load_dataset(args.data, "train", args.text_field, args.label_field), None)
    cls = class_index(args.cls, classes)
    if len(classes) == 1 and rank == 0:  # trains fine, but nothing can be classified against it
        print(f"warning: {args.data or 'the data'}: every label is {classes[0]!r}; a classifier needs texts of "
              "at least two classes (a model per class, or --class all)", file=sys.stderr)
    train, val = training_texts(args, reviews, cls, unsup)
    base = args.cls == BASE  # p(text) alone: no label slot, validated on every class's held-out texts
    n_classes = len(classes) if cls is None and not base else 0  # --class all: one joint model over (label, text)
    labels = range(len(classes)) if cls is None else [cls]
    name = BASE if base else "all" if cls is None else classes[cls]
    if not train:
        raise data.DataError(f"class {name}: no texts to train on in {args.data or 'IMDB'}")
    tokens = data.encode([r.text for r in train])
    model = init_model(args, n_classes, tokens).to(device).train()
    try:
        set_runtime(model, args.precision)
    except PrecisionError as e:  # bf16 on a GPU without it
        fail(f"error: --precision {args.precision}: {e}")
    # recorded (and compared on --resume) as built and run, not as given: a preset's head, auto's dtype
    args.adaptive_head, args.precision = model.config.adaptive_head, model.precision
    data.check_vocab(model.config.vocab_size, f"--init {args.init}")
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # after loading: EMA starts at the loaded weights
    max_len = model.config.model_length
    estimator = None  # --objective atat: trained beside the DiT, kept in train_state only (classify.py never sees it)
    if args.objective == "atat":
        cfg = atat.EstimatorConfig(model.config.vocab_size, args.atat_width, args.atat_layers, ATAT_HEADS, max_len)
        estimator = atat.ImportanceEstimator(cfg).to(device).train()
    # the class each text trains under: its label, or n_classes ("no class") for an unlabeled text
    text_labels = torch.tensor([n_classes if r.label == data.UNLABELED else r.label for r in train])
    val_set = [v for c in labels for v in [r for r in val if r.label == c][:args.val_texts]]
    val_tokens, val_labels = data.encode([v.text for v in val_set]), np.array([v.label for v in val_set])
    if not val_tokens:
        raise data.DataError(f"class {name}: too few texts to hold out 5% for validation "
                             f"({len(tokens)} texts: 5% rounds to none)")
    lengths = [min(len(ids), max_len) for ids in tokens]  # what a batch holds: long texts are cropped
    # the estimator starts from nothing, also when the DiT is fine-tuned at 2e-5: its peak lr is its own
    groups = [{"params": list(model.parameters()), "lr_scale": 1.0}] + \
        ([] if estimator is None else [{"params": list(estimator.parameters()),
                                        "lr_scale": ATAT_ESTIMATOR_LR / args.lr}])
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    counts = np.bincount([r.label for r in train if r.label != data.UNLABELED], minlength=len(classes))
    prior = (counts / counts.sum()).tolist() if n_classes else None  # the posterior readout's windows need it
    unlabeled = (text_labels == n_classes).numpy() if n_classes else np.zeros(len(train), dtype=bool)
    meta = {"class_index": cls, "class_name": name, "classes": classes, "class_prior": prior, "tokenizer": "gpt2",
            "n_labeled": int(counts.sum()), "n_unlabeled": sum(r.label == data.UNLABELED for r in train),
            "mask_index": model.config.vocab_size - 1,
            "train_args": {k: v for k, v in vars(args).items() if k != "resume"}}
    step = resume(args, model, ema, opt, estimator) if args.resume else 0
    if world > 1:  # gradients averaged over the processes; DDP also broadcasts rank 0's weights once
        # an adaptive head's tail cluster gets no gradient in a micro-batch with no target in it
        device_ids = None if device == "cpu" else [torch.cuda.current_device()]
        ddp = DistributedDataParallel(model, device_ids=device_ids,
                                      find_unused_parameters=bool(model.config.adaptive_head))
        ddp.config = model.config  # diffusion.nelbo reads it
        # its own process group: two DDP modules reducing in one backward must not share a communicator
        est_ddp = None if estimator is None else DistributedDataParallel(estimator, device_ids=device_ids,
                                                                         process_group=dist.new_group())
    else:
        ddp, est_ddp = model, estimator
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        n_long = sum(len(ids) > max_len for ids in tokens)
        kind = (f"joint over (label, text), {int(unlabeled.sum())} unlabeled texts" if n_classes
                else "a base of p(text), labels unread" if base else "one class")
        print(f"class {name} ({len(classes)} classes; {kind}): {len(tokens)} train / {len(val_tokens)} val texts, "
              f"{sum(len(ids) for ids in tokens)} tokens, {n_long} texts longer than {max_len} "
              "(trained on random windows); "
              f"{n_params / 1e6:.1f}M parameters on {device} x {world}; lr {args.lr}")
        if not base:  # a base reads no label
            fit_ngram(args, reviews, classes, val)
    # a NELBO at the unigram's cross-entropy means a model that reads no context (ngram.py)
    counts = CountsLM.fit(tokens)
    reference = {"val_unigram_nats": counts.unigram_nll(val_tokens), "val_bigram_nats": counts.bigram_nll(val_tokens)}
    return Run(args, rank, world, device, model, ema, opt, estimator, ddp, est_ddp, tokens, text_labels, n_classes,
               classes, val_tokens, val_labels, prior, meta,
               MicroBatches(lengths, unlabeled, args.batch_size, args.seed),
               step, step if args.resume else None, reference=reference)


def optimizer_step(run: Run, stop: list) -> tuple[dict, bool]:
    """One optimizer step: this process's micro-batches drawn (MicroBatch: windows, t, masks, from
    diffusion.draw_seed of the micro-batch index alone), forward and backward (step_backward), the
    losses and the stop request agreed by every process, grad-norm clipping at 1, AdamW, the EMA.
    Returns (the step's log record, whether a signal asks to stop); exits, before the update, on a
    loss or gradient that is not finite."""
    args, device, step = run.args, run.device, run.step
    t0 = time.perf_counter()
    for group in run.opt.param_groups:
        group["lr"] = lr_at(step, args) * group["lr_scale"]
    plan = [run.batches(step * args.grad_accum + j) for j in range(args.grad_accum)]
    lengths, max_len = run.batches.lengths, run.model.config.model_length
    n_tokens = sum(lengths[i] for idx in plan for i in idx)  # the step's real tokens, on every process
    parts = []
    for j in range(run.rank, args.grad_accum, run.world):  # this process's micro-batches: a distinct shard
        m = step * args.grad_accum + j  # global micro-batch index
        idx = plan[j]
        seed = diffusion.draw_seed(args.seed, m)
        g = torch.Generator().manual_seed(seed)  # windows, t, masks
        t = diffusion.antithetic_t(len(idx), g)  # drawn on the CPU, then moved: no device-to-host copy
        x0, attention_mask = data.collate([data.crop(run.tokens[i], max_len, g) for i in idx])
        u = torch.rand(attention_mask.shape, generator=g)  # masks where u < the masking rate (step_backward)
        attention_mask = None if attention_mask.all() else attention_mask  # checked on the CPU: no device sync
        y = slot_u = None
        if run.n_classes:  # the label slot's label (n_classes: unlabeled) and its uniform
            y, slot_u = run.text_labels[idx].to(device), torch.rand(len(idx), generator=g).to(device)
        parts.append(MicroBatch(seed, x0.to(device), None if attention_mask is None else attention_mask.to(device),
                                t.to(device), u.to(device), y, slot_u))
    atat_step = None
    if run.estimator is not None:
        tilt = atat.curriculum_tilt(step, args.max_steps, tuple(args.atat_phases), args.atat_tilt)
        atat_step = AtatStep(run.est_ddp, tilt, args.atat_estimator_weight)
    n_labeled = int(sum((run.text_labels[idx] < run.n_classes).sum() for idx in plan)) if run.n_classes else 0
    loss_sum, extra = step_backward(run.ddp, parts, n_tokens, run.world, atat_step, args.disc_weight, n_labeled)
    # one all-reduce for what every rank must agree on: the step's losses and whether to stop
    zero = torch.zeros((), dtype=torch.float64, device=device)
    names = sorted(extra)  # the same on every rank: the terms depend on the flags alone
    agreed = torch.stack([loss_sum, zero + len(stop), *(extra[k] for k in names)])
    if run.world > 1:
        dist.all_reduce(agreed)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    # the estimator is clipped apart (the DiT's clipping stays the plain objective's), its norm checked too
    est_norm = zero if run.estimator is None else torch.nn.utils.clip_grad_norm_(run.estimator.parameters(), 1.0)
    # one host sync for the step's scalars (the forward's boolean indexing syncs too, on CUDA)
    loss_sum, stopping, *values, grad_norm, est_norm = torch.cat([agreed, grad_norm.double()[None],
                                                                  est_norm.double()[None]]).tolist()
    extra = dict(zip(names, values))
    if run.estimator is not None:
        extra["estimator_grad_norm"] = est_norm
    if not all(map(math.isfinite, (loss_sum, grad_norm, *extra.values()))):
        fail(f"error: loss {loss_sum:.4g}, grad norm {grad_norm:.4g}"
             + "".join(f", {k.replace('_', ' ')} {v:.4g}" for k, v in extra.items())
             + f" at step {step + 1}; stopped before the update, {run.intact()}")
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    ema_update(run.ema, run.model, step, args.ema_decay)
    run.step += 1
    run.train_seconds += time.perf_counter() - t0
    run.tokens_seen += n_tokens
    record = {"step": run.step, "loss": loss_sum, "grad_norm": grad_norm, "lr": lr_at(step, args),
              "tokens_per_s": run.tokens_seen / run.train_seconds, **extra}
    if run.estimator is not None:
        record["tilt"] = tilt
    return record, bool(stopping)


def validate(run: Run) -> dict:
    """The EMA model on the held-out texts: the text's NELBO (nats/token, 2 draws, seed 1) under its
    own class; a joint model also under "no class" and per class, and the accuracy of both readouts
    (the posterior, and Bayes rule over the class NELBOs). Exits on a NELBO that is not finite."""
    args, val_tokens, n_classes = run.args, run.val_tokens, run.n_classes
    n_val_tokens = sum(len(ids) for ids in val_tokens)
    show_bar = run.rank == 0 and sys.stderr.isatty()  # its own progress bar only on a terminal: in a log,
                                                      # the step's line says it all
    if not n_classes:
        nats = float(score_texts([run.ema], val_tokens, k=2, seed=1, batch_size=args.batch_size, device=run.device,
                                 progress=show_bar).sum() / n_val_tokens)
        record = {"val_nats_per_token": nats}
    else:  # every held-out text under every class and under "no class", with the same draws
        n = score_texts([run.ema] * (n_classes + 1), val_tokens, k=2, seed=1, batch_size=args.batch_size,
                        device=run.device, class_labels=list(range(n_classes + 1)), progress=show_bar)
        own = n[np.arange(len(n)), run.val_labels]
        nats = float(own.sum() / n_val_tokens)
        log_post = score_posterior(run.ema, val_tokens, args.batch_size, run.device,
                                   np.log(np.maximum(run.prior, 1e-12)), progress=show_bar)
        by_nelbo, by_posterior = n[:, :n_classes].argmin(1), log_post.argmax(1)
        record = {"val_nats_per_token": nats,
                  "val_nats_per_token_no_class": float(n[:, n_classes].sum() / n_val_tokens),
                  "val_accuracy": float(np.mean(by_nelbo == run.val_labels)),
                  "val_accuracy_posterior": float(np.mean(by_posterior == run.val_labels)),
                  "val_readout_agreement": float(np.mean(by_nelbo == by_posterior))}
        for c in sorted(set(run.val_labels.tolist())):
            inside = run.val_labels == c
            record[f"val_nats_per_token_{run.classes[c]}"] = float(own[inside].sum() / sum(
                len(val_tokens[i]) for i in np.flatnonzero(inside)))
    if not math.isfinite(nats):
        fail(f"error: validation NELBO is {nats} at step {run.step}; not saved, {run.intact()}")
    return {**record, "val_ppl_bound": math.exp(nats), **run.reference}


def validation_line(record: dict) -> str:
    """The line a validation prints."""
    extra = "".join(f", {k[19:]} {v:.4f}" for k, v in record.items() if k.startswith("val_nats_per_token_"))
    accuracy = (f", val accuracy {record['val_accuracy_posterior']:.4f} posterior / {record['val_accuracy']:.4f} "
                f"nelbo (agree {record['val_readout_agreement']:.2f})") if "val_accuracy" in record else ""
    counts = (f" (unigram {record['val_unigram_nats']:.2f}, bigram {record['val_bigram_nats']:.2f})"
              if "val_unigram_nats" in record else "")
    return (f"step {record['step']}: val NELBO {record['val_nats_per_token']:.4f} nats/token{counts}{extra}, "
            f"ppl <= {record['val_ppl_bound']:.1f}{accuracy}, {record['tokens_per_s']:.0f} tokens/s")


def open_log(run: Run):
    """Rank 0's log.jsonl, opened to append: a new run starts it afresh; --resume cuts it back to its
    checkpoint (what came after, before a kill, is redone). Also removes the temporary files of a save
    that was killed. None on other ranks."""
    if run.rank > 0:
        return None
    out = Path(run.args.out)
    out.mkdir(parents=True, exist_ok=True)
    for junk in [*out.glob("*.tmp"), *out.glob(".tmp*")]:  # left by a save that was killed (ours, safetensors')
        junk.unlink()
    cut_log(out / "log.jsonl", run.step if run.args.resume else -1)
    return open(out / "log.jsonl", "a")


def preflight(args) -> None:
    """What a run needs from outside, checked before any data is loaded, every missing piece named in
    one error: the GPT-2 BPE (tiktoken's cache, TIKTOKEN_CACHE_DIR), the data (--data; IMDB: $IMDB_PATH
    or the download) and, unless --init scratch, the starting weights (a folder, or the hub's)."""
    def weights():
        try:
            resolve(DEFAULT_REPO if args.init == "hf" else args.init)
        except CheckpointError as e:  # the default's: say what else there is
            hint = ("; or train from scratch: --init scratch (the tiny preset without a GPU)" if args.init == "hf"
                    else "")
            raise CheckpointError(f"{e}{hint}") from None
    checks = [data.get_tokenizer, lambda: data.check_source(args.data)] + ([weights] if args.init != "scratch" else [])
    cli.preflight(checks, (data.DataError, CheckpointError))


def train(args, stop: list, texts: tuple[list, list, list] | None = None) -> Run:
    """The loop: set up, validate the starting weights, then optimizer steps, validating and saving a
    checkpoint every --eval-every steps and at the last; a signal (stop) saves and exits. texts: as set_up.
    Returns the finished Run (its .ema is the trained model)."""
    out = Path(args.out)
    if not args.resume and ((out / STATE).exists() or (out / CONFIG).exists()):
        fail(f"error: --out {out} already holds a checkpoint; pass --resume to continue it, or choose another folder")
    if texts is None:
        preflight(args)
    run = set_up(args, texts)
    log = open_log(run)
    if run.step == 0:
        record = validate(run)
        if log:
            log.write(json.dumps({"step": 0, **record}) + "\n")
    bar = progress(args.max_steps, "training", "step", disable=run.rank > 0, initial=run.step)
    while run.step < args.max_steps:
        record, stopping = optimizer_step(run, stop)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        checkpoint = stopping or run.step % args.eval_every == 0 or run.step == args.max_steps
        if checkpoint and not stopping:  # validation can wait; a signal may come with a deadline (SLURM, torchrun)
            record.update(validate(run))
            if log:
                bar.write(validation_line(record))
        if log:  # log first: a resume cuts the log back to its checkpoint, so no record goes missing
            log.write(json.dumps(record) + "\n")
            log.flush()
        if checkpoint:
            if run.rank == 0:
                save(args, run.model, run.ema, run.opt, run.step, run.meta, run.estimator)
            run.last_saved = run.step
        if stopping:
            signum = stop[0] if stop else signal.SIGTERM
            if run.rank == 0:
                print(f"stopped by {signal.Signals(signum).name} after step {run.step}: checkpoint saved in {out}; "
                      "continue with --resume", file=sys.stderr)
            raise SystemExit(128 + signum)
    bar.close()
    if log:
        log.close()
    return run


def main(argv=None):
    args = parse_args(argv)
    stop = []  # the signal that asked us to stop; acted on at the end of a step
    def on_signal(signum, frame):
        if stop:  # a second Ctrl-C: leave now
            raise KeyboardInterrupt
        stop.append(signum)
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_cli(lambda a: train(a, stop), args, (CheckpointError, data.DataError),
                "--batch-size (a larger --grad-accum keeps the global batch)",
                f"interrupted twice: exited without saving; the last checkpoint in {args.out} is intact")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


if __name__ == "__main__":
    main()
