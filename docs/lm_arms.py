"""Language-model arms at equal wall clock: does the text model learn language, and what stops it?

A measurement tool (docs/lm_plateau.md), not a product path. It trains one unconditional model on
the IMDB train reviews (train.py's 95 % part) for --seconds of training time and, every
--eval-seconds, measures on the first --eval-texts held-out reviews (their first --eval-len tokens):

- MDLM: the cross-entropy per masked token at a grid of t (eval.cross_entropy_by_t) and the NELBO
  per token (4 antithetic draws, Eq. 11);
- AR (--objective ar): the yardstick, the same DiT backbone with causal attention trained on the
  next-token loss; its NLL per predicted token;
- MDLM: the t = 0.1 cross-entropy again with every attention output zeroed (is the context used?);
- both beside the unigram and bigram counts models of the same tokens (ngram.py).

Each flag is one candidate cause of the unigram plateau; the defaults are train.py's recipe:

    python docs/lm_arms.py --name recipe --seconds 600 --json runs/arms/recipe.json
    python docs/lm_arms.py --name ar --objective ar --seconds 600 --json runs/arms/ar.json
    python docs/lm_arms.py --name no-clip --clip 0 --seconds 600 --json runs/arms/no-clip.json
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import diffusion  # noqa: E402
import model as dit  # noqa: E402
from eval import cross_entropy_by_t  # noqa: E402
from ngram import CountsLM  # noqa: E402
from train import frequency_rank  # noqa: E402

GRID = (0.05, 0.1, 0.3, 0.5, 0.9)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--objective", choices=["mdlm", "ar"], default="mdlm")
    p.add_argument("--loss", choices=["time", "count", "flat"], default="time",
                   help="MDLM loss: time (1/t, Eq. 11), count (n/k, diffusion.nelbo_count), flat (unweighted masked CE)")
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--eval-seconds", type=float, default=120)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--clip", type=float, default=1.0, help="grad-norm clip (0: none)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--adaptive-head", type=int, default=4096, help="0: a full 50,258-way Linear")
    p.add_argument("--time-conditioning", action="store_true")
    p.add_argument("--no-adaln-zero", action="store_true", help="gates start at 1 (bias), not 0")
    p.add_argument("--eval-texts", type=int, default=128)
    p.add_argument("--eval-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    return p.parse_args(argv)


def causal_attention(qkv, attention_mask, packing=None, kernel=None):
    """model.attention made causal (the AR control): right padding is never reached by a real query."""
    B, L, _, H, D = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, H * D)


def build(args, train_tokens):
    cfg = dit.DiTConfig(model_length=args.seq_len, hidden_dim=args.width, cond_dim=64, n_blocks=args.depth,
                        n_heads=args.heads, dropout=args.dropout, time_conditioning=args.time_conditioning,
                        adaptive_head=args.adaptive_head)
    torch.manual_seed(args.seed)
    m = dit.DiT(cfg)
    if cfg.adaptive_head:
        m.output_layer.token_rank.copy_(frequency_rank(train_tokens, cfg.vocab_size - 1))
    if args.no_adaln_zero:  # shift 0, scale 0, gate 1: each block starts as a plain pre-norm block
        for b in m.blocks:
            with torch.no_grad():
                b.adaLN_modulation.bias.view(6, -1)[[2, 5]] = 1.0
    return m


def ar_nll(m, x0, attention_mask):
    """Next-token NLL: the sum over predicted tokens (nats) and their count. x0 [B, L] right-padded."""
    inp, tgt = x0[:, :-1], x0[:, 1:]
    valid = attention_mask[:, 1:]
    log_p = m(inp, torch.zeros(len(x0)), None, output_mask=valid, targets=tgt[valid])
    return -log_p.sum(), int(valid.sum())


def mdlm_loss(m, args, x0, attention_mask, g):
    n_tokens = int(attention_mask.sum())
    if args.loss == "count":
        lengths = attention_mask.sum(1).tolist()
        masked = diffusion.per_text_count_draws(lengths, 1, [int(s) for s in torch.randint(2**31, (len(x0),), generator=g)])
        masked = masked[:, :x0.shape[1]]
        return diffusion.nelbo_count(m, x0, masked, attention_mask).sum() / n_tokens
    t = diffusion.antithetic_t(len(x0), g)
    masked = diffusion.mask_positions(t, attention_mask, g)
    if args.loss == "flat":  # every masked token weighs 1: not a bound, the plain masked-LM loss
        nll = diffusion.token_nll(m, x0, masked, diffusion.model_sigma(m, t), attention_mask)
        return nll.sum() / max(int(masked.sum()), 1)
    return diffusion.nelbo(m, x0, t, masked, attention_mask).sum() / n_tokens


@torch.no_grad()
def evaluate(m, args, eval_tokens):
    m.eval()
    x0, am = data.collate(eval_tokens)
    if args.objective == "ar":
        total, count = 0.0, 0
        for s in range(0, len(x0), 32):
            nll, n = ar_nll(m, x0[s:s + 32], am[s:s + 32])
            total, count = total + float(nll), count + n
        out = {"ar_nll": total / count}
    else:
        by_t = cross_entropy_by_t(m, eval_tokens, GRID, seed=1, batch_size=32, device="cpu")
        t, masked = diffusion.per_text_draws([len(e) for e in eval_tokens], 4, [diffusion.draw_seed(1, i) for i in range(len(eval_tokens))])
        nelbo = diffusion.nelbo(m, x0.repeat_interleave(4, 0), t, masked, am.repeat_interleave(4, 0))
        attention = dit.attention  # the ablation: does the prediction at t = 0.1 use attention at all?
        dit.attention = lambda qkv, *a, **k: torch.zeros(*qkv.shape[:2], qkv.shape[3] * qkv.shape[4])
        blind = cross_entropy_by_t(m, eval_tokens, (0.1,), seed=1, batch_size=32, device="cpu")[0]
        dit.attention = attention
        out = {"by_t": {r["t"]: r["nats_per_masked_token"] for r in by_t},
               "nelbo_per_token": float(nelbo.sum() / 4 / am.sum()),
               "no_attention_t0.1": blind["nats_per_masked_token"]}
    m.train()
    return out


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("ARMS_THREADS", torch.get_num_threads())))
    reviews, _ = data.load_dataset(None, "train")
    train, val = data.train_val_split(reviews)
    train_tokens = data.encode([r.text for r in train])
    eval_tokens = [ids[:args.eval_len] for ids in data.encode([r.text for r in val[:args.eval_texts]])]
    counts = CountsLM.fit(train_tokens)
    ref = {"unigram": counts.unigram_nll(eval_tokens), "bigram": counts.bigram_nll(eval_tokens)}
    print(f"{args.name}: eval {len(eval_tokens)} texts, unigram {ref['unigram']:.3f}, bigram {ref['bigram']:.3f} nats/token")
    m = build(args, train_tokens).train()
    if args.objective == "ar":
        dit.attention = causal_attention  # DiTBlock calls model.attention: the backbone, causal
    opt = torch.optim.AdamW(m.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    log, step, tokens_seen, clock, next_eval = [], 0, 0, 0.0, 0.0
    while True:
        if clock >= next_eval or clock >= args.seconds:
            rec = {"step": step, "train_seconds": round(clock, 1), "tokens": tokens_seen, **evaluate(m, args, eval_tokens)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
            next_eval += args.eval_seconds
            if clock >= args.seconds:
                break
        t0 = time.perf_counter()
        idx = rng.integers(len(train_tokens), size=args.batch_size)
        x0, am = data.collate([data.crop(train_tokens[i], args.seq_len, g) for i in idx])
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
        if args.objective == "ar":
            nll, n = ar_nll(m, x0, am)
            loss = nll / n
        else:
            loss = mdlm_loss(m, args, x0, am, g)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(m.parameters(), args.clip if args.clip > 0 else math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += int(am.sum())
        clock += time.perf_counter() - t0
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} grad_norm {norm.item():.1f} {tokens_seen / clock:.0f} tok/s", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "reference": ref, "log": log}, indent=1))


if __name__ == "__main__":
    main()
