"""Speed and memory of training and classification, on whatever device it runs.

    python bench.py --preset tiny                          # CPU: a minute or two
    python bench.py --preset small --compile               # CUDA: every variant
    python bench.py --preset small --real --data aclImdb_v1.tar.gz

Training: tokens/s, ms per optimizer step (NELBO forward + backward, grad clip, AdamW, EMA, as in
train.py) on full-length random sequences, peak memory and MFU (model FLOPs, see flops_per_token,
x tokens/s / peak bf16 FLOP/s of the GPU; on CPU only with --peak-tflops).
Classification: reviews/s scoring a class pair (two models, common random numbers) with
classify.score_texts at K draws per review, on random token ids whose lengths follow IMDB test
(lognormal through median 219 and p90 574 GPT-2 tokens: mean ~290) or, with --real, on real test
reviews. The baseline of every ratio is measured in the same run: for classification the naive
path (fp32, batch of 1, every review padded to 512 tokens, logits at every position); for training
the first row (fp32, SDPA, eager).
Variants: bf16 vs fp32 (CUDA only), flash-attn vs SDPA (only if flash_attn imports), length-bucketed
vs padded batches (padded = batches in input order, padded to their longest review), and
torch.compile (--compile).
Peak memory: torch.cuda.max_memory_allocated on CUDA (reset before each row); on CPU the process's
max RSS (getrusage), which only grows during the run. Warm-up runs are not timed.
"""
import argparse
import contextlib
import copy
import math
import resource
import time
from unittest import mock

import numpy as np
import torch

import classify
import data
import diffusion
import model as dit
from model import DiT, DiTConfig, PRESETS
from train import ema_update

IMDB_TEST_MEDIAN, IMDB_TEST_P90 = 219, 574  # GPT-2 tokens per IMDB test review (shared/data/README.md)
NAIVE_LEN = 512                             # the naive path pads every review to this many tokens
# E[move_chance(t)] for t ~ U[SAMPLING_EPS, 1] (antithetic t is uniform too): ~0.5 of the tokens are masked
MASKED_FRACTION = (1 - diffusion.EPS) * (1 + diffusion.SAMPLING_EPS) / 2
# dense bf16 tensor-core FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name(); first match wins
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_token(cfg: DiTConfig, seq_len: int, masked_fraction: float) -> float:
    """Model FLOPs of one training step (forward + backward) per real token; divide by 3 for a forward pass.

    cfg: the model; seq_len: tokens per sequence (attention cost grows with it); masked_fraction:
    share of tokens masked (MASKED_FRACTION on average), the only ones the NELBO computes logits for.
    Counts matrix multiplies: 2 FLOPs per multiply-add, backward twice the forward, so 6 FLOPs per
    weight and use (Kaplan et al. 2020: 6 x non-embedding params + attention). The weights are split
    by how often they act: the blocks' on every token, the output layer's on masked positions only,
    the time conditioning's (adaLN, sigma MLP; 8% of the small model's non-embedding weights) once a
    sequence. Embedding lookups, biases, norms, softmax and elementwise ops are not counted.
    """
    d, c, L = cfg.hidden_dim, cfg.cond_dim, seq_len
    per_token = cfg.n_blocks * 12 * d * d            # qkv 3d^2 + attention output d^2 + MLP 2 x 4d^2, every token
    attention = cfg.n_blocks * 2 * d * L             # q k^T and softmax(.) v: L x head_dim per head, twice, every token
    per_masked = d * cfg.vocab_size + c * 2 * d      # output layer and its adaLN shift/scale, masked positions only
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
    logits and SUBS at every position. Same draws and result as classify.score_texts: float64 [N, C] nats."""
    mask_index = models[0].config.vocab_size - 1
    out = np.zeros((len(token_lists), len(models)))
    for i, ids in enumerate(token_lists):
        t, masked = diffusion.per_text_draws([len(ids)], k, [seed * 1_000_003 + i])  # classify's seed per text
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


_autocast = torch.autocast


def _no_autocast(device_type, *args, **kwargs):
    return _autocast(device_type, enabled=False)


@contextlib.contextmanager
def variant(fp32: bool = False, sdpa: bool = False, padded: bool = False):
    """Run model.DiT in float32 (it autocasts to bf16 on CUDA), with SDPA instead of flash-attn,
    and/or with classify.score_texts batching reviews in input order instead of by length."""
    with contextlib.ExitStack() as stack:
        if fp32:
            stack.enter_context(mock.patch.object(torch, "autocast", _no_autocast))
        if sdpa:
            stack.enter_context(mock.patch.object(dit, "flash_attn_varlen_qkvpacked_func", None))
        if padded:
            stack.enter_context(mock.patch.object(data, "length_batches", in_order_batches))
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


def bench_train(cfg, device, args, compile_: bool, **flags) -> dict:
    """One training step of train.py (NELBO / real tokens, backward, clip 1, AdamW, EMA) on random
    full-length sequences. Returns tokens/s, ms/step, peak memory MiB."""
    model = random_model(cfg, args.seed).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    forward = torch.compile(model) if compile_ else model
    B, L = args.train_batch, cfg.model_length
    x0 = torch.randint(0, cfg.vocab_size - 1, (B, L), device=device)
    attention_mask = torch.ones(B, L, dtype=torch.bool, device=device)
    g = torch.Generator().manual_seed(args.seed)

    def step(i):
        t = diffusion.antithetic_t(B, g)
        masked = diffusion.mask_positions(t, attention_mask.cpu(), g).to(device)
        loss = diffusion.nelbo(forward, x0, t.to(device), masked, attention_mask).sum() / attention_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, i, 0.9999)

    reset_peak_memory(device)
    with variant(**flags):
        # compiled: the 2nd step recompiles for the varying number of masked positions; not timed
        seconds, _ = timed(step, device, max(args.warmup, 2) if compile_ else args.warmup, args.steps)
    return {"tokens/s": B * L / seconds, "ms/step": 1e3 * seconds, "peak MiB": peak_memory_mib(device)}


def bench_score(models, tokens, k, device, args, warmup: int = 0, naive: bool = False, **flags) -> dict:
    """reviews/s, peak memory and NELBOs [N, C] (to check that every path computes the same thing) of
    scoring `tokens` with every model at k draws per review (classify.score_texts, or score_naive),
    after `warmup` untimed calls on 2 reviews with 1 draw."""
    def score(toks, k):
        if naive:
            return score_naive(models, toks, k, args.seed, device)
        return classify.score_texts(models, toks, k, args.seed, args.batch_size, device)

    with variant(**flags):
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
        print("| " + " | ".join(r[c].ljust(width[c]) if c in TEXT_COLUMNS else r[c].rjust(width[c]) for c in cols) + " |")


def peak_flops(device, tflops: float | None) -> float | None:
    """--peak-tflops, else the known dense bf16 peak of this GPU, else None (no MFU column)."""
    if tflops:
        return tflops * 1e12
    if device == "cuda":
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return None


def mfu(flops_per_s: float, peak: float | None) -> str:
    return f"{100 * flops_per_s / peak:.1f}%" if peak else "-"


def review_flops(cfg: DiTConfig, lengths) -> float:
    """Mean model FLOPs of one forward pass over one review (1/3 of flops_per_token per token)."""
    return float(np.mean([n * flops_per_token(cfg, n, MASKED_FRACTION) / 3 for n in lengths]))


def training_table(cfg, device, args, peak, train_rows) -> None:
    L = cfg.model_length
    rows = []
    for name, compile_, flags in train_rows:
        r = bench_train(cfg, device, args, compile_, **flags)
        if not rows:
            base = r["tokens/s"]
        rows.append({"variant": name, "batch": f"{args.train_batch}x{L}", "tokens/s": f"{r['tokens/s']:.0f}",
                     "ms/step": f"{r['ms/step']:.1f}", "peak MiB": f"{r['peak MiB']:.0f}",
                     "MFU": mfu(r["tokens/s"] * flops_per_token(cfg, L, MASKED_FRACTION), peak),
                     f"vs {train_rows[0][0]}": f"{r['tokens/s'] / base:.2f}x"})
    print_table(f"training ({args.steps} steps after {args.warmup} warm-up)", rows)


def classification_table(cfg, device, args, peak, score_rows) -> None:
    if args.real:
        reviews = data.balanced_subset(data.load_imdb("test", args.data), args.reviews + args.reviews % 2)
        tokens = data.encode([r.text for r in reviews], cfg.model_length)
        source = f"{len(tokens)} real IMDB test reviews"
    else:
        rng = np.random.default_rng(args.seed)
        tokens = [rng.integers(0, cfg.vocab_size - 1, n).tolist() for n in synthetic_lengths(args.reviews, cfg.model_length, rng)]
        source = f"{len(tokens)} random reviews of IMDB-test-like lengths"
    lengths = np.array([len(ids) for ids in tokens])
    n_naive = min(args.naive_reviews, len(tokens))
    models = [random_model(cfg, args.seed + c).to(device).eval() for c in range(2)]
    compiled = [torch.compile(m, dynamic=True) for m in models] if args.compile else None
    # (name, reviews, models, flags of bench_score); the naive path, the baseline, comes first
    paths = [(f"naive: fp32, 1 x {NAIVE_LEN}, all logits", tokens[:n_naive], models, {"naive": True, "fp32": True, "sdpa": True})]
    paths += [(name, tokens, compiled if compile_ else models, flags) for name, compile_, flags in score_rows]
    rows, warm = [], set()
    for k in args.ks:
        for name, toks, ms, flags in paths:
            if flags.get("padded") and not 2 <= args.batch_size // k < len(toks):
                continue  # batch_size // k reviews share a forward pass: padding matters with 2+ of them in 2+ batches
            r = bench_score(ms, toks, k, device, args, 0 if name in warm else args.warmup, **flags)
            warm.add(name)
            if flags.get("naive"):
                naive = r  # first in paths: the baseline of this k's rows
            rows.append({"K": str(k), "variant": name, "reviews/s": f"{r['reviews/s']:.2f}", "peak MiB": f"{r['peak MiB']:.0f}",
                         "MFU": mfu(r["reviews/s"] * 2 * k * review_flops(cfg, [len(t) for t in toks]), peak),  # 2 models, k draws
                         "vs naive": f"{r['reviews/s'] / naive['reviews/s']:.2f}x",
                         "max |dNELBO| vs naive": f"{np.abs(r['nelbo'][:n_naive] - naive['nelbo']).max():.1e}"})
    print_table(f"classification: class pair on {source} (mean {lengths.mean():.0f} / median {np.median(lengths):.0f} / "
                f"p90 {np.percentile(lengths, 90):.0f} tokens), {args.batch_size} sequences per forward; "
                f"naive path on the first {n_naive}", rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", choices=PRESETS, help="model sizes (default: small on CUDA, tiny on CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, help="peak FLOP/s for MFU, in TFLOP/s (default: known GPUs' dense bf16)")
    p.add_argument("--steps", type=int, help="timed training steps (default 20 CUDA, 2 CPU)")
    p.add_argument("--warmup", type=int, help="untimed warm-up calls (default 3 CUDA, 1 CPU)")
    p.add_argument("--train-batch", type=int, help="training sequences per step (default 16 CUDA, 2 CPU)")
    p.add_argument("--reviews", type=int, help="reviews scored per row (default 512 CUDA, 4 CPU)")
    p.add_argument("--naive-reviews", type=int, help="reviews scored by the slow naive path (default 32 CUDA, 1 CPU)")
    p.add_argument("--batch-size", type=int, help="sequences (review x draw) per forward pass (default 64 CUDA, 2 CPU)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16], help="draws per review")
    p.add_argument("--real", action="store_true", help="real IMDB test reviews (a balanced subset) instead of random ids")
    p.add_argument("--data", help="aclImdb tarball or folder for --real (default: $IMDB_PATH, else download)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    for name, gpu, cpu in [("preset", ["small"], ["tiny"]), ("steps", 20, 2), ("warmup", 3, 1), ("train_batch", 16, 2),
                           ("reviews", 512, 4), ("naive_reviews", 32, 1), ("batch_size", 64, 2)]:
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
    print(f"{dev_name}; torch {torch.__version__}; peak {peak / 1e12:g} TFLOP/s" if peak else f"{dev_name}; torch {torch.__version__}; no peak FLOP/s (MFU not shown)")

    for preset in args.preset:
        cfg = PRESETS[preset]
        print(f"\n## {preset}: {sum(p.numel() for p in DiT(cfg).parameters()) / 1e6:.1f}M parameters; "
              f"{flops_per_token(cfg, cfg.model_length, MASKED_FRACTION) / 1e6:.1f} MFLOP per token per training step "
              f"at {cfg.model_length} tokens, {MASKED_FRACTION:.3f} masked")
        training_table(cfg, device, args, peak, train_rows)
        classification_table(cfg, device, args, peak, score_rows)
    if not cuda:
        print("\npeak MiB on CPU: the process's max RSS so far (it never goes down), not the row's own peak")


if __name__ == "__main__":
    main()
