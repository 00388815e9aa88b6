"""Speed and memory of training and classification, against the machine's own limit, in one run.

    python bench.py --real --json bench.json               # CPU: the tiny preset, a few minutes
    python bench.py --preset small --compile               # CUDA: every variant

Machine limit (CPU): float32 torch.mm FLOP/s at a large square size and at the models' own shapes
(MLP, output head); the best of them is the denominator of the CPU MFU columns. On CUDA the
denominator is the GPU's dense bf16 peak (or --peak-tflops).
Every preset is measured with the full linear output head (today's path, the Hugging Face layout)
and with the adaptive-softmax head (model.FinalLayer).
Training: tokens/s, ms per optimizer step (NELBO forward + backward, grad clip, AdamW, EMA, as in
train.py) on full-length sequences packed from the reviews, peak memory, model GFLOP/s
(flops_per_token x tokens/s) and MFU. Classification: reviews/s scoring a class pair (two
models, common random numbers) with scoring.score_texts at K draws per review, on real IMDB
test reviews (--real) or synthetic ones (lengths like IMDB test: lognormal through median 219 and
p90 574 GPT-2 tokens; ids by Zipf's law). The baselines of the ratios are measured in the same
run: the naive path (fp32, batch of 1, every review padded to 512 tokens, logits at every
position, first model) and today's path (the first model's first fast row); for training the first row.
Variants: bf16 vs fp32 (CUDA only), flash-attn vs SDPA (only if flash_attn imports), length-bucketed
vs padded batches (padded = batches in input order, padded to their longest review), and
torch.compile (--compile). Readouts: one joint model over (label, text) (the last preset and head,
n_classes = 2), reviews/s of Bayes rule over its two class NELBOs (fixed K = 2, and classify.py's
sequential default: rounds of 2 up to 8 draws) against the one-pass posterior readout
(scoring.score_posterior), as ratios to the first row. --json OUT writes every table.
Peak memory: torch.cuda.max_memory_allocated on CUDA (reset before each row); on CPU the process's
max RSS (getrusage), which only grows during the run. Warm-up runs are not timed.
"""
import contextlib
import copy
import dataclasses
import json
import math
import resource
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import classify
import data
from cli import ArgumentParser
import diffusion
import model as dit
import scoring
import train
from convert_hf import atomic_write
from model import DiT, DiTConfig, PRESETS, set_runtime
from train import ema_update

IMDB_TEST_MEDIAN, IMDB_TEST_P90 = 219, 574  # GPT-2 tokens per IMDB test review (shared/data/README.md)
NAIVE_LEN = 512                             # the naive path pads every review to this many tokens
ADAPTIVE_HEAD = 4096                        # the adaptive head measured beside a preset's full head
# E[move_chance(t)] for t ~ U[SAMPLING_EPS, 1] (antithetic t is uniform too): ~0.5 of the tokens are masked
MASKED_FRACTION = (1 - diffusion.EPS) * (1 + diffusion.SAMPLING_EPS) / 2
# dense bf16 tensor-core FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name(); first match wins
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def head_macs(cfg: DiTConfig, tail_shares: tuple[float, float] = (0.0, 0.0)) -> float:
    """Multiply-adds of the output head at one masked position (its adaLN shift/scale not included).

    Full head: hidden x (vocab_size - 1) (the real tokens' columns, model.FinalLayer). Adaptive head
    (adaptive_head = S): hidden x (S + 2) for the head softmax, plus, for the share of targets in
    each tail cluster (tail_shares: ranks S..4S-1, then 4S..), the cluster's projection and softmax:
    hidden x w + w x cluster size at width w = hidden / 4, hidden / 16 (model.adaptive_cutoffs)."""
    d, S = cfg.hidden_dim, cfg.adaptive_head
    if not S:
        return d * (cfg.vocab_size - 1)
    sizes, widths = (3 * S, cfg.vocab_size - 1 - 4 * S), (d // 4, d // 16)
    return d * (S + 2) + sum(share * (d * w + w * n) for share, w, n in zip(tail_shares, widths, sizes))


def flops_per_token(cfg: DiTConfig, seq_len: int, masked_fraction: float, tail_shares: tuple[float, float] = (0.0, 0.0)) -> float:
    """Model FLOPs of one training step (forward + backward) per real token; divide by 3 for a forward pass.

    cfg: the model; seq_len: tokens per sequence (attention cost grows with it); masked_fraction:
    share of tokens masked (MASKED_FRACTION on average), the only ones the NELBO computes logits for;
    tail_shares: for an adaptive head, the share of masked targets in its two tail clusters (head_macs).
    Counts matrix multiplies: 2 FLOPs per multiply-add, backward twice the forward, so 6 FLOPs per
    weight and use (Kaplan et al. 2020: 6 x non-embedding params + attention). The weights are split
    by how often they act: the blocks' on every token, the output layer's on masked positions only,
    the time conditioning's (adaLN, sigma MLP; 8% of the small model's non-embedding weights) once a
    sequence. Embedding lookups, biases, norms, softmax and elementwise ops are not counted.
    """
    d, c, L = cfg.hidden_dim, cfg.cond_dim, seq_len
    per_token = cfg.n_blocks * 12 * d * d            # qkv 3d^2 + attention output d^2 + MLP 2 x 4d^2, every token
    attention = cfg.n_blocks * 2 * d * L             # q k^T and softmax(.) v: L x head_dim per head, twice, every token
    per_masked = head_macs(cfg, tail_shares) + c * 2 * d  # output head and its adaLN shift/scale, masked positions only
    per_sequence = cfg.n_blocks * c * 6 * d + dit.FREQ_EMBED_DIM * c + c * c  # adaLN of the blocks + sigma MLP, once a sequence
    return 6 * (per_token + attention + masked_fraction * per_masked + per_sequence / L)


def synthetic_lengths(n: int, max_len: int, rng: np.random.Generator) -> list[int]:
    """n review lengths from the lognormal through IMDB test's median and p90, clipped to [8, max_len]."""
    sigma = math.log(IMDB_TEST_P90 / IMDB_TEST_MEDIAN) / 1.2815516  # z of the 90th percentile
    return np.clip(rng.lognormal(math.log(IMDB_TEST_MEDIAN), sigma, n).round(), 8, max_len).astype(int).tolist()


def random_model(cfg: DiTConfig, seed: int) -> DiT:
    """DiT(cfg) with its zero-initialised (adaLN-Zero) weights drawn too, so that it does not output constants."""
    torch.manual_seed(seed)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model


@torch.inference_mode()
def score_naive(models: list, token_lists: list[list[int]], k: int, seed: int, device,
                pad_to: int = NAIVE_LEN) -> np.ndarray:
    """How the earlier team scored: one (review, draw) per forward pass, padded to pad_to tokens,
    logits and SUBS at every position. Same draws and result as scoring.score_texts: float64 [N, C] nats."""
    mask_index = models[0].config.vocab_size - 1
    out = np.zeros((len(token_lists), len(models)))
    for i, ids in enumerate(token_lists):
        t, masked = diffusion.per_text_draws([len(ids)], k, [diffusion.draw_seed(seed, i, 0, 0)])  # classify's draws
        x0, attention_mask = data.collate([ids])
        pad = max(pad_to, len(ids)) - len(ids)
        x0, attention_mask, masked = (torch.cat([a, a.new_zeros(len(a), pad)], 1).to(device) for a in (x0, attention_mask, masked))
        for j in range(k):
            xt = torch.where(masked[j], mask_index, x0)  # [1, L]
            sigma = t[j:j + 1].to(device)
            for c, model in enumerate(models):
                logits = model(xt, diffusion.model_sigma(model, sigma), attention_mask)  # [1, L, V]
                log_p = diffusion.subs_log_probs(logits, xt, mask_index).gather(-1, x0[..., None])  # 0 where not masked
                out[i, c] -= float(log_p.sum() * diffusion.loss_weight(t[j])) / k
    return out


# ---- variants ---------------------------------------------------------------------------------
def in_order_batches(lengths: list[int], batch_size: int, rng=None) -> list[list[int]]:
    """data.length_batches without the sorting: consecutive reviews, padded to the longest of each batch."""
    return [list(range(i, min(i + batch_size, len(lengths)))) for i in range(0, len(lengths), batch_size)]


@contextlib.contextmanager
def variant(models: list, fp32: bool = False, sdpa: bool = False, padded: bool = False):
    """Run the models (model.DiT, or torch.compile of one) in float32 rather than the device's default
    precision (bf16 on CUDA), with SDPA instead of flash-attn's varlen kernel (model.set_runtime),
    and/or with scoring.score_texts batching reviews in input order instead of by length."""
    for m in models:
        m = getattr(m, "_orig_mod", m)  # the model inside torch.compile's wrapper
        set_runtime(m, "fp32" if fp32 else "auto")
        if sdpa:
            m.varlen_kernel = None
    with mock.patch.object(data, "length_batches", in_order_batches) if padded else contextlib.nullcontext():
        yield


# ---- measuring --------------------------------------------------------------------------------
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mib(device) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(fn, device, warmup: int, repeat: int):
    """(seconds per call of fn(i), what the last call returned), after `warmup` untimed calls."""
    for i in range(warmup):
        fn(i)
    sync(device)
    start, out = time.perf_counter(), None
    for i in range(warmup, warmup + repeat):
        out = fn(i)
    sync(device)
    return (time.perf_counter() - start) / repeat, out


def review_tokens(args, max_len: int) -> tuple[list[list[int]], str]:
    """The reviews every row uses: real IMDB test reviews (--real, a balanced subset), or synthetic
    ones of IMDB-test-like lengths whose token ids follow Zipf's law (p(id) ~ 1 / (id + 1)), so that
    an adaptive head meets a realistic share of rare tokens. Returns (token lists, a description)."""
    if args.real:
        reviews = data.balanced_subset(data.load_imdb("test", args.data), args.reviews + args.reviews % 2)
        return data.encode([r.text for r in reviews], max_len), f"{len(reviews)} real IMDB test reviews"
    rng = np.random.default_rng(args.seed)
    p = 1 / np.arange(1, data.get_tokenizer().n_vocab + 1)
    lengths = synthetic_lengths(args.reviews, max_len, rng)
    return [rng.choice(len(p), n, p=p / p.sum()).tolist() for n in lengths], f"{len(lengths)} synthetic (Zipf) reviews"


def bench_model(cfg: DiTConfig, seed: int, rank: torch.Tensor, device) -> DiT:
    """random_model(cfg), with an adaptive head's token_rank set from the reviews (train.frequency_rank)."""
    model = random_model(cfg, seed)
    if cfg.adaptive_head:
        model.output_layer.token_rank.copy_(rank)
    return model.to(device)


def tail_shares(cfg: DiTConfig, tokens: list[list[int]], rank: torch.Tensor) -> tuple[float, float]:
    """Share of the reviews' tokens in the adaptive head's two tail clusters (head_macs)."""
    if not cfg.adaptive_head:
        return 0.0, 0.0
    r = rank[torch.tensor([i for ids in tokens for i in ids])]
    S = cfg.adaptive_head
    return float(((r >= S) & (r < 4 * S)).float().mean()), float((r >= 4 * S).float().mean())


def bench_matmul(m: int, k: int, n: int, device, seconds: float = 1.0) -> float:
    """FLOP/s of torch.mm [m, k] x [k, n] in float32 (the machine's own limit at that shape), timed
    over about `seconds` after one warm-up call."""
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    torch.mm(a, b)
    sync(device)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        calls += 1
        sync(device)
    return 2 * m * k * n * calls / (time.perf_counter() - start)


def limit_table(cfgs, device, args, report) -> float:
    """fp32 torch.mm FLOP/s at a large square size and at the models' own shapes; returns the best
    (the denominator of the CPU MFU columns)."""
    L, B = max(c.model_length for _, c in cfgs), args.train_batch
    shapes = [("square 2048", 2048, 2048, 2048)]
    for name, cfg in cfgs:
        d, n_masked = cfg.hidden_dim, int(B * cfg.model_length * MASKED_FRACTION)
        shapes.append((f"{name}: MLP up, [{B}x{cfg.model_length}, {d}] x [{d}, {4 * d}]", B * cfg.model_length, d, 4 * d))
        out = cfg.adaptive_head + 2 if cfg.adaptive_head else cfg.vocab_size - 1
        shapes.append((f"{name}: output head, [{n_masked}, {d}] x [{d}, {out}]", n_masked, d, out))
    rows, seen = [], set()
    for name, m, k, n in shapes:
        if (m, k, n) in seen:
            continue
        seen.add((m, k, n))
        rows.append({"variant": name, "GFLOP/s": f"{bench_matmul(m, k, n, device) / 1e9:.1f}"})
    report("machine limit: float32 torch.mm", rows)
    return max(float(r["GFLOP/s"]) for r in rows) * 1e9


def bench_train(cfg, device, args, compile_: bool, tokens, rank, **flags) -> dict:
    """One training step of train.py (NELBO / real tokens, backward, clip 1, AdamW, EMA) on full-length
    sequences packed from the reviews. Returns tokens/s, ms/step, peak memory MiB."""
    model = bench_model(cfg, args.seed, rank, device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    forward = torch.compile(model) if compile_ else model
    B, L = args.train_batch, cfg.model_length
    stream = [i for ids in tokens for i in ids]
    stream = stream * -(-B * L // len(stream))
    x0 = torch.tensor(stream[:B * L]).view(B, L).to(device)
    attention_mask = torch.ones(B, L, dtype=torch.bool)
    g = torch.Generator().manual_seed(args.seed)

    def step(i):
        t = diffusion.antithetic_t(B, g)
        masked = diffusion.mask_positions(t, attention_mask, g).to(device)
        loss = diffusion.nelbo(forward, x0, t.to(device), masked).sum() / (B * L)  # full length: no padding, no mask
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, i, 0.9999)

    reset_peak_memory(device)
    with variant([model, ema], **flags):
        # compiled: the 2nd step recompiles for the varying number of masked positions; not timed
        seconds, _ = timed(step, device, max(args.warmup, 2) if compile_ else args.warmup, args.steps)
    return {"tokens/s": B * L / seconds, "ms/step": 1e3 * seconds, "peak MiB": peak_memory_mib(device)}


def bench_score(models, tokens, k, device, args, warmup: int = 0, naive: bool = False, **flags) -> dict:
    """reviews/s, peak memory and NELBOs [N, C] (to check that every path computes the same thing) of
    scoring `tokens` with every model at k draws per review (scoring.score_texts, or score_naive),
    after `warmup` untimed calls on 2 reviews with 1 draw."""
    def score(toks, k):
        if naive:
            return score_naive(models, toks, k, args.seed, device)
        return scoring.score_texts(models, toks, k, args.seed, args.batch_size, device)

    with variant(models, **flags):
        for _ in range(warmup):
            score(tokens[:2], 1)
        reset_peak_memory(device)
        seconds, nelbo = timed(lambda i: score(tokens, k), device, 0, 1)
    return {"reviews/s": len(tokens) / seconds, "peak MiB": peak_memory_mib(device), "nelbo": nelbo}


TEXT_COLUMNS = ("variant", "model")  # left-aligned by print_table


def print_table(title: str, rows: list[dict]) -> None:
    """rows: dicts with the same keys, values already strings; printed as a Markdown table."""
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print(f"\n{title}\n")
    print("| " + " | ".join(c.ljust(width[c]) for c in cols) + " |")
    print("|" + "|".join("-" * (width[c] + 2) for c in cols) + "|")
    for r in rows:  # names left, numbers right
        print("| " + " | ".join(r[c].ljust(width[c]) if c in TEXT_COLUMNS else r[c].rjust(width[c]) for c in cols) + " |", flush=True)


def peak_flops(device, tflops: float | None) -> float | None:
    """--peak-tflops, else the known dense bf16 peak of this GPU, else None (on CPU: the measured torch.mm limit)."""
    if tflops:
        return tflops * 1e12
    if device == "cuda":
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return None


def mfu(flops_per_s: float, peak: float | None) -> str:
    return f"{100 * flops_per_s / peak:.1f}%" if peak else "-"


def review_flops(cfg: DiTConfig, lengths, shares=(0.0, 0.0)) -> float:
    """Mean model FLOPs of one forward pass over one review (1/3 of flops_per_token per token)."""
    return float(np.mean([n * flops_per_token(cfg, n, MASKED_FRACTION, shares) / 3 for n in lengths]))


def training_table(cfgs, device, args, peak, train_rows, tokens, rank, report) -> None:
    rows = []
    for cname, cfg in cfgs:
        L, shares = cfg.model_length, tail_shares(cfg, tokens, rank)
        for name, compile_, flags in train_rows:
            r = bench_train(cfg, device, args, compile_, tokens, rank, **flags)
            if not rows:
                base = r["tokens/s"]
            flops = r["tokens/s"] * flops_per_token(cfg, L, MASKED_FRACTION, shares)
            rows.append({"variant": f"{cname}, {name}", "batch": f"{args.train_batch}x{L}", "tokens/s": f"{r['tokens/s']:.0f}",
                         "ms/step": f"{r['ms/step']:.1f}", "peak MiB": f"{r['peak MiB']:.0f}",
                         "GFLOP/s": f"{flops / 1e9:.1f}", "MFU": mfu(flops, peak), "vs first row": f"{r['tokens/s'] / base:.2f}x"})
    report(f"training ({args.steps} steps after {args.warmup} warm-up), first row = today's path", rows)


def classification_table(cfgs, device, args, peak, score_rows, tokens, rank, source, report) -> None:
    lengths = np.array([len(ids) for ids in tokens])
    n_naive = min(args.naive_reviews, len(tokens))
    rows, warm, naive = [], set(), {}  # naive[k]: the baseline row; naive[(k, "today")]: the first model's first fast row
    for ci, (cname, cfg) in enumerate(cfgs):
        shares = tail_shares(cfg, tokens, rank)
        models = [bench_model(cfg, args.seed + c, rank, device).eval() for c in range(2)]
        compiled = [torch.compile(m, dynamic=True) for m in models] if args.compile else None
        paths = [] if ci else [(f"naive: fp32, 1 x {NAIVE_LEN}, all logits", tokens[:n_naive], models,
                                {"naive": True, "fp32": True, "sdpa": True})]  # the baseline: the first model's naive path
        paths += [(name, tokens, compiled if compile_ else models, flags) for name, compile_, flags in score_rows]
        for k in args.ks:
            for name, toks, ms, flags in paths:
                if flags.get("padded") and not 2 <= args.batch_size < len(toks):
                    continue  # batch_size reviews share a forward pass: padding matters with 2+ of them in 2+ batches
                r = bench_score(ms, toks, k, device, args, 0 if (cname, name) in warm else args.warmup, **flags)
                warm.add((cname, name))
                if flags.get("naive"):
                    naive[k] = r
                elif ci == 0 and (k, "today") not in naive:
                    naive[(k, "today")] = r  # the first model's first fast row: today's path
                flops = r["reviews/s"] * 2 * k * review_flops(cfg, [len(t) for t in toks], shares)  # 2 models, k draws
                same_model = ci == 0
                rows.append({"K": str(k), "variant": f"{cname}, {name}", "reviews/s": f"{r['reviews/s']:.2f}",
                             "peak MiB": f"{r['peak MiB']:.0f}", "GFLOP/s": f"{flops / 1e9:.1f}", "MFU": mfu(flops, peak),
                             "vs naive": f"{r['reviews/s'] / naive[k]['reviews/s']:.2f}x",
                             "vs today": f"{r['reviews/s'] / naive[(k, 'today')]['reviews/s']:.2f}x" if (k, "today") in naive else "-",
                             "max abs dNELBO vs naive": f"{np.abs(r['nelbo'][:n_naive] - naive[k]['nelbo']).max():.1e}" if same_model else "-"})
    report(f"classification: class pair on {source} (mean {lengths.mean():.0f} / median {np.median(lengths):.0f} / "
           f"p90 {np.percentile(lengths, 90):.0f} tokens), {args.batch_size} reviews (x K draws) per forward; "
           f"naive path on the first {n_naive}", rows)


def readout_table(cfg: DiTConfig, device, args, tokens, rank, report) -> None:
    """reviews/s of the two readouts of one joint model (random weights, so sequential scoring rarely
    stops early: its row is the slow end), each after one untimed warm-up call."""
    model = set_runtime(bench_model(dataclasses.replace(cfg, n_classes=2), args.seed, rank, device).eval(), "auto", inference=True)
    rows, base = [], None
    for name, kwargs in [("nelbo, K = 2 fixed", {"readout": "nelbo", "max_draws": 2}),
                         ("nelbo, sequential 2 up to 8 (classify.py's default)", {"readout": "nelbo"}),
                         ("posterior, one pass per window", {"readout": "posterior"})]:
        clf = classify.DiffusionClassifier([model, model], ["neg", "pos"], mc_samples=2, seed=args.seed,
                                           batch_size=args.batch_size, class_labels=[0, 1], **kwargs)
        clf.draws(tokens[:2])
        seconds, draws = timed(lambda i: clf.draws(tokens), device, 0, 1)
        rate = len(tokens) / seconds
        base = base or rate
        rows.append({"variant": name, "reviews/s": f"{rate:.1f}", "draws/review": f"{np.mean(scoring.draws_taken(draws)):.2f}",
                     "vs first row": f"{rate / base:.2f}x"})
    report(f"readouts of one joint model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
           f"{'adaptive head ' + str(cfg.adaptive_head) if cfg.adaptive_head else 'full head'}), {len(tokens)} reviews, "
           f"{args.batch_size} per forward", rows)


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--preset", nargs="+", choices=PRESETS, help="model sizes (default: small on CUDA, tiny on CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, help="peak FLOP/s for MFU, in TFLOP/s (default: known GPUs' dense bf16; "
                   "on CPU the float32 torch.mm limit measured in the same run)")
    p.add_argument("--steps", type=int, help="timed training steps (default 20 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, help="untimed warm-up calls (default 3 CUDA, 1 CPU)")
    p.add_argument("--train-batch", type=int, help="training sequences per step (default 16 CUDA, 4 CPU)")
    p.add_argument("--reviews", type=int, help="reviews scored per row (default 512 CUDA, 32 CPU)")
    p.add_argument("--naive-reviews", type=int, help="reviews scored by the slow naive path (default 32 CUDA, 2 CPU)")
    p.add_argument("--batch-size", type=int, help="reviews per forward pass, each with its K draws, as classify.py "
                   "(None: 32 CUDA, 16 CPU; docs/speed.md's older tables used 64 / 32 *sequences*)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4], help="draws per review")
    p.add_argument("--real", action="store_true", help="real IMDB test reviews (a balanced subset) instead of synthetic ones")
    p.add_argument("--data", help="aclImdb tarball or folder for --real (default: $IMDB_PATH, else download)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.add_argument("--json", help="also write every table here (JSON)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    for name, gpu, cpu in [("preset", ["small"], ["tiny"]), ("steps", 20, 3), ("warmup", 3, 1), ("train_batch", 16, 4),
                           ("reviews", 512, 32), ("naive_reviews", 32, 2), ("batch_size", 32, 16)]:
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    device, peak = args.device, peak_flops(args.device, args.peak_tflops)
    flash = dit.flash_attn_varlen_qkvpacked_func is not None and cuda
    # rows: (name, torch.compile, variant flags); the first training row is the baseline of the ratio
    train_rows = [("fp32 sdpa", False, {"fp32": True, "sdpa": True})]
    if cuda:
        train_rows.append(("bf16 sdpa", False, {"sdpa": True}))
    if flash:
        train_rows.append(("bf16 flash", False, {}))
    if args.compile:  # the fastest eager variant, compiled
        train_rows.append((train_rows[-1][0] + " compiled", True, train_rows[-1][2]))
    default = ("bf16 " if cuda else "fp32 ") + ("flash" if flash else "sdpa")  # what classify.py runs
    score_rows = [(f"{default} bucketed", False, {}), (f"{default} padded", False, {"padded": True})]
    if cuda:
        score_rows.append(("fp32 sdpa bucketed", False, {"fp32": True, "sdpa": True}))
    if flash:
        score_rows.append(("bf16 sdpa bucketed", False, {"sdpa": True}))
    if args.compile:
        score_rows.append((f"{default} bucketed compiled", True, {}))
    dev_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    tables = {"device": dev_name, "torch": torch.__version__, "args": vars(args)}

    def report(title, rows):
        print_table(title, rows)
        tables.setdefault("tables", []).append({"title": title, "rows": rows})

    # every preset with the full linear head (today's path; the Hugging Face layout) and the adaptive one
    cfgs = []
    for preset in args.preset:
        base = PRESETS[preset]
        for s in sorted({0, base.adaptive_head or ADAPTIVE_HEAD}):
            cfgs.append((f"{preset} {'adaptive head ' + str(s) if s else 'full head'}", dataclasses.replace(base, adaptive_head=s)))
    tokens, source = review_tokens(args, max(c.model_length for _, c in cfgs))
    rank = train.frequency_rank(tokens, cfgs[0][1].vocab_size - 1) if args.real else torch.arange(cfgs[0][1].vocab_size - 1)
    print(f"{dev_name}; torch {torch.__version__}")
    for name, cfg in cfgs:
        print(f"{name}: {sum(p.numel() for p in DiT(cfg).parameters()) / 1e6:.1f}M parameters; "
              f"{flops_per_token(cfg, cfg.model_length, MASKED_FRACTION, tail_shares(cfg, tokens, rank)) / 1e6:.1f} MFLOP per "
              f"token per training step at {cfg.model_length} tokens, {MASKED_FRACTION:.3f} masked")
    if peak is None and not cuda:
        peak = limit_table(cfgs, device, args, report)
    print(f"MFU denominator: {peak / 1e9:.1f} GFLOP/s" if peak else "no peak FLOP/s known (MFU not shown; pass --peak-tflops)")
    training_table(cfgs, device, args, peak, train_rows, tokens, rank, report)
    classification_table(cfgs, device, args, peak, score_rows, tokens, rank, source, report)
    readout_table(cfgs[-1][1], device, args, tokens, rank, report)
    if not cuda:
        print("\npeak MiB on CPU: the process's max RSS so far (it never goes down), not the row's own peak")
    if args.json:
        atomic_write(Path(args.json), lambda f: f.write_text(json.dumps(tables, indent=1) + "\n"))


if __name__ == "__main__":
    main()
