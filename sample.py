"""Generate text with an MDLM checkpoint by ancestral sampling (diffusion.ddpm / ddpm_cache).

Every sample starts fully masked at t = 1 (a --prompt fixes its first tokens) and takes --steps
reverse steps to t = 0, where no mask token is left. With --cache (the default) the model is
called only after a step that unmasked something; the samples are the same as with --no-cache.
Tokens are GPT-2's (tiktoken, no BOS/EOS); the mask token is vocab_size - 1.

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
import diffusion
from convert_hf import CheckpointError, load_hf
from model import set_runtime

GPT2_VOCAB = 50257  # tiktoken "gpt2" ids 0..50256; the model adds the mask token after them


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def main(argv=None):
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
    sampler = diffusion.ddpm_cache if args.cache else diffusion.ddpm
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


if __name__ == "__main__":
    main()
