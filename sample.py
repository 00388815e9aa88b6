"""Generate text with an MDLM checkpoint: the samplers (ddpm, ddpm_cache), then the command line.

The samplers run the reverse process of Sahoo et al. 2024 (arXiv 2406.07524, §4 / App. A) on the
schedule and SUBS of diffusion.py. Every sample starts fully masked at t = 1 (a --prompt fixes its
first tokens) and takes --steps reverse steps to t = 0, where no mask token is left. With --cache
(the default) the model is called only after a step that unmasked something; the samples are the
same as with --no-cache. Tokens are GPT-2's (tiktoken, no BOS/EOS); the mask token is vocab_size - 1.

    python sample.py --ckpt ckpt/pos --num-samples 4 --steps 1000 --length 256 --seed 0
    python sample.py --ckpt ckpt/pos --prompt "This movie was" --top-p 0.9 --jsonl --out samples.jsonl

Output: one text per line (newlines inside a text are written as the two characters \\n, \\r), or with
--jsonl one JSON object per sample with the exact text, its tokens, the step count and the number
of model calls of its batch. Samples depend on --seed and --batch-size.
"""
import argparse
import json
import sys
import time

import torch

import data
from cli import ArgumentParser, run_cli
from convert_hf import CheckpointError, load_hf
from diffusion import masked_log_probs, model_sigma, move_chance
from model import set_runtime


# ---- reverse process (§4 / App. A) ----
# Ancestral sampling of the absorbing-state process with SUBS (the reference's `ddpm` sampler).
# From time t to s < t, p_theta(x_s | x_t) is the forward posterior q(x_s | x_t, x0) with x0
# replaced by the SUBS prediction p_theta(x0 | x_t), position by position:
#   x_t^i unmasked -> x_s^i = x_t^i                                     (carry-over)
#   x_t^i masked   -> unmasked with probability (alpha_s - alpha_t) / (1 - alpha_t)
#                     = (move_chance(t) - move_chance(s)) / move_chance(t),
#                     taking a token drawn from p_theta(x0^i | x_t); else it stays masked.
# The T steps run on the even grid 1 = t_0 > t_1 > ... > t_T = 0. move_chance(0) = 0, so the last
# step unmasks every position still masked (the reference stops at t = 1e-3 and fills the rest
# with an argmax "noise removal" pass instead). Every step draws the same random numbers, two
# uniforms per position, so `ddpm_cache` sees exactly the randomness that `ddpm` sees.
def sampling_times(steps: int) -> torch.Tensor:
    """The grid 1 = t_0 > t_1 > ... > t_T = 0 of a T-step sampler, evenly spaced: float64 [steps + 1]."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def unmask_probability(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Chance that a position masked at time t is unmasked by time s < t:
    (alpha_s - alpha_t) / (1 - alpha_t) = (move_chance(t) - move_chance(s)) / move_chance(t); 1 at s = 0."""
    return (move_chance(t) - move_chance(s)) / move_chance(t)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep, per row, the most probable tokens up to and
    including the one whose cumulative probability reaches top_p; renormalise.

    probs: float [N, V], rows summing to 1. Returns float [N, V] (same dtype), zero outside the
    nucleus. The most probable token is always kept; ties are ordered by token id.
    """
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p  # probability mass strictly before this token
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
    return kept / kept.sum(-1, keepdim=True)


def sample_categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse-CDF sampling: the first id whose cumulative probability reaches
    (1 - u) * total.

    probs: float [N, V], non-negative (need not be normalised); u: float [N] uniforms in [0, 1).
    Returns long [N]. Works in float64 (float32 sums over 50K entries lose the tail), and never
    returns a token of probability 0, because the target (1 - u) * total is > 0.
    """
    cdf = probs.double().cumsum(-1)
    target = (1 - u.double()) * cdf[:, -1]
    return torch.searchsorted(cdf, target[:, None]).squeeze(-1)


def _draw_tokens(logits: torch.Tensor, u: torch.Tensor, mask_index: int, top_p: float, chunk: int = 256) -> torch.Tensor:
    """Tokens x0 ~ p_theta(x0 | x_t) (SUBS at masked positions, optional nucleus) for N positions.

    logits: float [N >= 1, V] raw model output; u: float64 [N] uniforms. Returns long [N], never mask_index.
    Rows go `chunk` at a time so that the float64 work stays small when N is large.
    """
    out = []
    for start in range(0, logits.shape[0], chunk):
        probs = masked_log_probs(logits[start:start + chunk], mask_index).double().exp()
        if top_p < 1:
            probs = top_p_filter(probs, top_p)
        out.append(sample_categorical(probs, u[start:start + chunk]))
    return torch.cat(out)


def _check_sampler_input(model, xt, steps, top_p, fixed) -> None:
    """Raise ValueError, with a one-line reason, for arguments the sampler cannot use."""
    cfg = model.config
    mask_index = cfg.vocab_size - 1
    if model.training:
        raise ValueError("sampling needs model.eval(): dropout would make the model output random")
    if xt.dim() != 2 or xt.dtype != torch.long:
        raise ValueError(f"xt must be a LongTensor [batch, length], got {xt.dtype} {tuple(xt.shape)}")
    if not 1 <= xt.shape[1] <= cfg.model_length:
        raise ValueError(f"length {xt.shape[1]}: must be between 1 and the model's model_length {cfg.model_length}")
    if steps < 1:
        raise ValueError(f"steps {steps}: must be >= 1")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p {top_p}: must be in (0, 1]")
    if xt.numel() and (xt.min() < 0 or xt.max() > mask_index):
        raise ValueError(f"xt holds token ids outside [0, {mask_index}] (vocab_size {cfg.vocab_size})")
    if fixed is None:
        return
    if fixed.shape != xt.shape or fixed.dtype != torch.bool:
        raise ValueError(f"fixed must be a BoolTensor of xt's shape {tuple(xt.shape)}, got {fixed.dtype} {tuple(fixed.shape)}")
    if (xt[fixed] == mask_index).any():
        raise ValueError("fixed positions must hold given tokens, not the mask token")
    if (xt[~fixed] != mask_index).any():
        raise ValueError("positions that are not fixed must start as the mask token (x_1 is all masks)")


@torch.inference_mode()
def _ancestral(model, xt, steps, generator, top_p, fixed, cache) -> tuple[torch.Tensor, int]:
    """The shared loop of ddpm (cache=False) and ddpm_cache (cache=True); see ddpm."""
    _check_sampler_input(model, xt, steps, top_p, fixed)
    mask_index = model.config.vocab_size - 1
    cache = cache and not model.config.time_conditioning  # with sigma(t) as input, the output changes every step
    B, L = xt.shape
    rng_device = generator.device if generator is not None else "cpu"
    times = sampling_times(steps)
    x = xt.clone()
    logits, calls = None, 0  # logits: model output at the masked positions of x, [N_masked, V]
    for i in range(steps):
        t, s = times[i], times[i + 1]
        # drawn every step, before anything else, whether or not the model is called
        u_unmask = torch.rand(B, L, generator=generator, device=rng_device).to(x.device)
        u_token = torch.rand(B, L, generator=generator, device=rng_device, dtype=torch.float64).to(x.device)
        masked = x == mask_index
        if logits is None or not cache:
            t_batch = torch.full((B,), float(t), device=x.device)
            logits = model(x, model_sigma(model, t_batch), output_mask=masked)
            calls += 1
        unmask = masked & (u_unmask < unmask_probability(t, s))
        if unmask.any():
            x[unmask] = _draw_tokens(logits[unmask[masked]], u_token[unmask], mask_index, top_p)
            logits = None  # x changed: the model output must be recomputed
    return x, calls


def ddpm(model, xt: torch.Tensor, steps: int, generator: torch.Generator | None = None,
         top_p: float = 1.0, fixed: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Ancestral sampling of x0 ~ p_theta with T = `steps` reverse steps, one model call per step.

    xt: long [B, L], the state at t = 1: the mask token (vocab_size - 1) at every position to
    generate, given tokens at `fixed` positions (a prompt, or the context of an infill).
    fixed: bool [B, L] or None (= the non-mask positions of xt); fixed positions never change
    (carry-over). generator: the torch.Generator of all random draws (two uniforms [B, L] per
    step; on the generator's device, CPU when None). top_p: nucleus filtering of p_theta(x0 | x_t)
    (1 = off). The model must be in eval mode; L <= model_length.
    Returns (x0 long [B, L] with no mask token, number of model calls = steps).
    """
    return _ancestral(model, xt, steps, generator, top_p, fixed, cache=False)


def ddpm_cache(model, xt: torch.Tensor, steps: int, generator: torch.Generator | None = None,
               top_p: float = 1.0, fixed: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """ddpm, calling the model only when x_t has changed since its last call (§4).

    With time_conditioning=False the model output depends on x_t alone, so in a step where no
    position of the batch was unmasked the previous output is reused. Every step draws the same
    random numbers as ddpm, so for the same generator state the result is identical to ddpm's
    (given a deterministic forward pass, as on CPU), with at most
    min(steps, 1 + number of masked positions in xt) model calls. A time-conditioned model is
    called every step, as in ddpm.
    Arguments and return value as ddpm.
    """
    return _ancestral(model, xt, steps, generator, top_p, fixed, cache=True)


# ---- command line ----------------------------------------------------------------------------
GPT2_VOCAB = 50257  # tiktoken "gpt2" ids 0..50256; the model adds the mask token after them


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True, help="checkpoint folder (config.json + model.safetensors) or hub id")
    p.add_argument("--num-samples", type=data.positive(), default=1)
    p.add_argument("--steps", type=data.positive(), default=1000, help="reverse steps T (model calls without --cache)")
    p.add_argument("--length", type=data.positive(), help="tokens per sample, prompt included (default: the model's model_length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of p_theta(x0 | x_t); 1 = off")
    p.add_argument("--prompt", help="text whose tokens are fixed as the prefix of every sample")
    p.add_argument("--jsonl", action="store_true", help="write one JSON object per sample")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the model output while no token changes (ddpm_cache; same samples, fewer calls)")
    p.add_argument("--batch-size", type=data.positive(), default=8, help="samples generated together")
    p.add_argument("--out", help="output file (default: stdout)")
    args = p.parse_args(argv)
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p {args.top_p}: must be in (0, 1]")
    return args


def start_state(n: int, length: int, prompt_ids: list[int], mask_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x at t = 1: the mask token everywhere except the prompt prefix. Returns xt long [n, length], fixed bool [n, length]."""
    xt = torch.full((n, length), mask_index, dtype=torch.long)
    fixed = torch.zeros(n, length, dtype=torch.bool)
    xt[:, :len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
    fixed[:, :len(prompt_ids)] = True
    return xt, fixed


def run(argv=None):
    args = parse_args(argv)
    try:
        model = load_hf(args.ckpt)
    except CheckpointError as e:  # names the folder or file and the keys
        sys.exit(f"error: {e}")
    cfg = model.config
    mask_index = cfg.vocab_size - 1
    if mask_index > GPT2_VOCAB:
        sys.exit(f"error: {args.ckpt}: vocab_size {cfg.vocab_size} has ids GPT-2 cannot decode (at most {GPT2_VOCAB + 1})")
    length = args.length or cfg.model_length
    if not 1 <= length <= cfg.model_length:
        sys.exit(f"error: --length {length}: must be between 1 and the model's model_length {cfg.model_length}")
    prompt_ids = data.encode([args.prompt], cfg.model_length)[0] if args.prompt else []
    if len(prompt_ids) >= length:
        sys.exit(f"error: --prompt has {len(prompt_ids)} tokens, which leaves nothing to generate at --length {length}")
    if any(i >= mask_index for i in prompt_ids):
        sys.exit(f"error: --prompt has token ids >= {mask_index}, outside this checkpoint's vocabulary (vocab_size {cfg.vocab_size})")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    set_runtime(model.to(device), "auto", inference=True)  # bf16 on CUDA, fp32 on CPU
    sampler = ddpm_cache if args.cache else ddpm
    generator = torch.Generator().manual_seed(args.seed)
    enc = data.get_tokenizer()
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    start, total_calls = time.perf_counter(), 0
    for first in range(0, args.num_samples, args.batch_size):
        n = min(args.batch_size, args.num_samples - first)
        xt, fixed = start_state(n, length, prompt_ids, mask_index)
        x0, calls = sampler(model, xt.to(device), args.steps, generator, args.top_p, fixed.to(device))
        total_calls += calls
        if (x0 == mask_index).any():  # the last step unmasks everything; this would be a sampler bug
            raise RuntimeError("a sample still holds the mask token")
        for j, ids in enumerate(x0.tolist()):
            text = enc.decode(ids)
            if args.jsonl:
                record = {"sample": first + j, "text": text, "tokens": ids, "prompt": args.prompt, "length": length,
                          "steps": args.steps, "model_calls": calls, "cache": args.cache, "top_p": args.top_p, "seed": args.seed}
                out.write(json.dumps(record) + "\n")
            else:
                out.write(text.replace("\r", "\\r").replace("\n", "\\n") + "\n")
        out.flush()
    if args.out:
        out.close()
    seconds = time.perf_counter() - start
    print(f"{args.num_samples} samples x {length} tokens, {args.steps} steps, {total_calls} model calls "
          f"({'cache' if args.cache else 'no cache'}), {seconds:.1f} s on {device}", file=sys.stderr)


def main(argv=None):
    run_cli(run, argv, (CheckpointError, data.DataError))  # one line for bad data, offline, out of memory, Ctrl-C


if __name__ == "__main__":
    main()
