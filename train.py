"""Fine-tune one class model: an MDLM trained on the texts of a single class.

    python train.py --class 0 --out ckpt/neg                        # IMDB, from mdlm-owt-noeos (hub)
    python train.py --class neg --init scratch --preset tiny --lr 1e-3 --out ckpt/neg
    python train.py --data my.jsonl --class sports --out ckpt/sports  # any labeled dataset (data.py)
    python train.py --class all --out ckpt/base                     # a base model on every text (IMDB: + unsup)

The model trains on the 'train' split (data.load_dataset; a dataset without splits holds out
its test split first) less a validation set: 5% of each class, seed 0, the same for every run.
A text longer than model_length contributes a random window of model_length tokens each time it
is drawn (data.crop), seeded by the micro-batch index, so a resumed run sees the same windows.

Objective: the continuous-time NELBO of diffusion.py, in nats per real token, with antithetic t
over each micro-batch. AdamW, linear warmup then constant lr, grad-norm clipping at 1, bf16
autocast on CUDA. An EMA of the weights, started from the *loaded* weights, is what gets
validated, saved as model.safetensors and used by classify.py. Both class models must be trained
with identical flags (only --class differs).

Output folder: config.json (model config + training facts), model.safetensors (EMA weights, HF
layout), train_state.safetensors + train_state.json (raw weights, AdamW moments; for --resume),
log.jsonl (training loss and validation NELBO).
"""
import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
import diffusion
from classify import score_texts
from convert_hf import DEFAULT_REPO, CheckpointError, atomic_write, load_hf, save_checkpoint
from model import DiT, PRESETS

FINETUNE_LR, SCRATCH_LR = 2e-5, 3e-4  # 2e-5: the public mdlm-owt fine-tune; 3e-4: MDLM pre-training


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--class", dest="cls", required=True,
                   help="class name or index (IMDB: neg = 0, pos = 1), or 'all' for a base model on every text")
    data.add_data_args(p)
    p.add_argument("--init", default="hf", help=f"'hf' ({DEFAULT_REPO}), 'scratch', or a checkpoint folder / hub id")
    p.add_argument("--preset", choices=PRESETS, help="model size for --init scratch (default small)")
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="texts per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help=f"peak lr (default {FINETUNE_LR} fine-tuning, {SCRATCH_LR} from scratch)")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--eval-every", type=int, default=100, help="validate and checkpoint every N steps")
    p.add_argument("--val-reviews", type=int, default=256, help="held-out texts per class used for validation")
    p.add_argument("--out", required=True, help="checkpoint folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    args = p.parse_args(argv)
    if args.preset and args.init != "scratch":
        p.error("--preset applies to --init scratch only (a loaded checkpoint brings its own config)")
    for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "val_reviews"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr is not None and args.lr <= 0:
        p.error("--lr must be > 0")
    args.lr = args.lr or (SCRATCH_LR if args.init == "scratch" else FINETUNE_LR)
    return args


def class_index(name: str, classes: list[str]) -> int | None:
    """--class NAME_OR_INDEX -> index into classes (a name first, then a number); 'all' -> None.
    Raises DataError for anything else."""
    if name == "all":
        return None
    if name in classes:
        return classes.index(name)
    if name.isdigit() and int(name) < len(classes):
        return int(name)
    raise data.DataError(f"--class {name}: expected one of {', '.join(classes)}, an index 0..{len(classes) - 1}, or all")


def init_model(args) -> DiT:
    if args.init == "scratch":
        torch.manual_seed(args.seed)
        return DiT(PRESETS[args.preset or "small"])
    return load_hf(DEFAULT_REPO if args.init == "hf" else args.init)


def lr_at(step: int, args) -> float:
    return args.lr * min(1.0, (step + 1) / args.warmup_steps)


@torch.no_grad()
def ema_update(ema: DiT, model: DiT, step: int, decay: float) -> None:
    """ema = d * ema + (1 - d) * model, with d = min(decay, (1 + step) / (10 + step)) so that
    short runs are not dominated by the starting weights."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)


def save(args, model, ema, opt, step, meta):
    out = Path(args.out)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        for k, v in opt.state.get(p, {}).items():
            if k != "step":  # the step count is `step`
                state[f"adam.{i}.{k}"] = v
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "train_state.safetensors",
                 lambda p: save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, p))
    atomic_write(out / "train_state.json", lambda p: p.write_text(json.dumps({"step": step})))
    save_checkpoint(ema.state_dict(), ema.config, out, {**meta, "step": step})


def resume(args, model, ema, opt) -> int:
    """Load raw weights, AdamW moments and EMA from --out; returns the step to continue from."""
    out = Path(args.out)
    step = json.loads((out / "train_state.json").read_text())["step"]
    state = load_file(out / "train_state.safetensors")
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")}, strict=True)
    ema.load_state_dict(load_hf(str(out)).state_dict(), strict=True)
    for i, p in enumerate(model.parameters()):
        if f"adam.{i}.exp_avg" in state:
            opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": state[f"adam.{i}.exp_avg"].to(p.device),
                            "exp_avg_sq": state[f"adam.{i}.exp_avg_sq"].to(p.device)}
    return step


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (CheckpointError, data.DataError) as e:
        raise SystemExit(f"error: {e}")


def train(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reviews, classes = data.load_dataset(args.data, "train", args.text_field, args.label_field)
    cls = class_index(args.cls, classes)
    train, val = data.train_val_split(reviews)  # fixed seed: the same held-out set for every run
    if cls is None:
        train += data.load_dataset(args.data, "unsup", args.text_field, args.label_field)[0]
    labels = range(len(classes)) if cls is None else [cls]
    name = "all" if cls is None else classes[cls]
    model = init_model(args).to(device).train()
    data.check_vocab(model.config.vocab_size, f"--init {args.init}")
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # after loading: EMA starts at the loaded weights
    max_len = model.config.model_length
    tokens = data.encode([r.text for r in train if cls is None or r.label == cls])
    val_tokens = data.encode([v.text for c in labels for v in [r for r in val if r.label == c][:args.val_reviews]])
    lengths = [min(len(ids), max_len) for ids in tokens]  # what a batch holds: long texts are cropped
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    meta = {"class_index": cls, "class_name": name, "classes": classes, "tokenizer": "gpt2",
            "mask_index": model.config.vocab_size - 1, "train_args": {k: v for k, v in vars(args).items() if k != "resume"}}
    if args.resume and not Path(args.out, "train_state.json").is_file():
        raise SystemExit(f"error: --resume: no checkpoint in {args.out} (train_state.json not found)")
    step = resume(args, model, ema, opt) if args.resume else 0
    n_params = sum(p.numel() for p in model.parameters())
    n_long = sum(len(ids) > max_len for ids in tokens)
    print(f"class {name} ({len(classes)} classes): {len(tokens)} train / {len(val_tokens)} val texts, "
          f"{sum(len(ids) for ids in tokens)} tokens, {n_long} texts longer than {max_len} (trained on random windows); "
          f"{n_params / 1e6:.1f}M parameters on {device}; lr {args.lr}")

    def validate():
        n = score_texts([ema], val_tokens, k=2, seed=1, batch_size=args.batch_size, device=device)[:, 0]
        nats = float(n.sum() / sum(len(ids) for ids in val_tokens))
        return {"val_nats_per_token": nats, "val_ppl_bound": math.exp(nats)}

    Path(args.out).mkdir(parents=True, exist_ok=True)
    log = open(Path(args.out, "log.jsonl"), "a")
    if step == 0:
        log.write(json.dumps({"step": 0, **validate()}) + "\n")
    n_batches = len(data.length_batches(lengths, args.batch_size))
    epoch, batches = -1, []
    micro = step * args.grad_accum  # global micro-batch index: the data order depends only on it and --seed
    bar = tqdm(total=args.max_steps, initial=step, unit="step")
    tokens_seen, train_seconds = 0, 0.0
    while step < args.max_steps:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed * 1_000_003 + step)  # dropout: reproducible on resume
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss_sum = 0.0
        for _ in range(args.grad_accum):
            if micro // n_batches != epoch:  # a new epoch: a new seeded shuffle
                epoch = micro // n_batches
                batches = data.length_batches(lengths, args.batch_size, np.random.default_rng([args.seed, epoch]))
            idx = batches[micro % len(batches)]
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + micro)
            t = diffusion.antithetic_t(len(idx), g, device)
            x0, attention_mask = data.collate([data.crop(tokens[i], max_len, g) for i in idx], device)
            masked = diffusion.mask_positions(t, attention_mask.cpu(), g).to(device)
            n_tokens = attention_mask.sum()
            loss = diffusion.nelbo(model, x0, t, masked, attention_mask).sum() / n_tokens  # nats / token
            (loss / args.grad_accum).backward()
            loss_sum += loss.item() / args.grad_accum
            tokens_seen += int(n_tokens)
            micro += 1
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not math.isfinite(loss_sum):
            raise SystemExit(f"error: loss is {loss_sum} at step {step}; the last checkpoint in {args.out} is intact")
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, step, args.ema_decay)
        step += 1
        train_seconds += time.perf_counter() - t0
        rate = tokens_seen / train_seconds
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{rate:.0f}")
        record = {"step": step, "loss": loss_sum, "grad_norm": float(grad_norm), "lr": lr_at(step - 1, args), "tokens_per_s": rate}
        if step % args.eval_every == 0 or step == args.max_steps:
            record.update(validate())
            save(args, model, ema, opt, step, meta)
            bar.write(f"step {step}: val NELBO {record['val_nats_per_token']:.4f} nats/token, "
                      f"ppl <= {record['val_ppl_bound']:.1f}, {rate:.0f} tokens/s")
        log.write(json.dumps(record) + "\n")
        log.flush()
    bar.close()


if __name__ == "__main__":
    main()
