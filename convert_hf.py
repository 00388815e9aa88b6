"""Load Hugging Face MDLM checkpoints (and ours: same layout) into model.DiT, strictly.

A checkpoint folder holds `config.json` (the `MDLMConfig` fields) and `model.safetensors` with
`backbone.<name>` tensors, where <name> is a key of `DiT.state_dict()`. Nothing is dropped
silently: every expected tensor must be there once with the right shape, any other tensor is an
error, and the stored rotary `inv_freq` must equal the one the config implies.

    python convert_hf.py --repo kuleshov-group/mdlm-owt-noeos --out ckpt/base
"""
import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cli import ArgumentParser
from model import DiT, DiTConfig, max_adaptive_head

DEFAULT_REPO = "kuleshov-group/mdlm-owt-noeos"  # the bd3lms README spells it mdlm-noeos-owt
PREFIX = "backbone."
# buffers some HF classes (BD3LM with var_min) add beside the backbone; accepted and not used
OPTIONAL_KEYS = {"sampling_eps_min", "sampling_eps_max"}
WEIGHTS, CONFIG = "model.safetensors", "config.json"
# config fields the Hugging Face MDLMConfig does not have: absent means this default
OPTIONAL_FIELDS = {"n_classes": 0, "adaptive_head": 0}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message names the file and keys."""


def read_config(folder: Path) -> tuple[DiTConfig, dict]:
    """config.json -> (DiTConfig, the whole JSON dict). Raises CheckpointError for a missing folder or
    file, invalid JSON, or a field that is missing, mistyped or out of range (named)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a checkpoint folder needs {CONFIG} and {WEIGHTS})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object of config fields, got {type(raw).__name__}")
    fields = {}
    for f in dataclasses.fields(DiTConfig):
        if f.name not in raw and f.name not in OPTIONAL_FIELDS:
            raise CheckpointError(f"{path}: missing field '{f.name}'")
        value, kind = raw.get(f.name, OPTIONAL_FIELDS.get(f.name)), f.type
        ok = isinstance(value, bool) if kind is bool else (isinstance(value, (int, float))
                                                            and not isinstance(value, bool)
                                                            and (kind is float or isinstance(value, int)))
        if not ok:
            raise CheckpointError(f"{path}: field '{f.name}' should be {kind.__name__}, got {value!r}")
        least = 0 if f.name in OPTIONAL_FIELDS else 1
        if kind is int and value < least:
            raise CheckpointError(f"{path}: field '{f.name}' should be >= {least}, got {value}")
        fields[f.name] = kind(value)
    cfg = DiTConfig(**fields)
    if cfg.hidden_dim % cfg.n_heads or cfg.hidden_dim // cfg.n_heads % 2:
        raise CheckpointError(f"{path}: hidden_dim {cfg.hidden_dim} should split into n_heads {cfg.n_heads} "
                              "heads of even size (rotary)")
    if cfg.adaptive_head and not cfg.adaptive_head <= max_adaptive_head(cfg.vocab_size):
        raise CheckpointError(f"{path}: field 'adaptive_head' {cfg.adaptive_head}: "
                              f"4 x it must be below the {cfg.vocab_size - 1} real tokens")
    if not 0 <= cfg.dropout < 1:
        raise CheckpointError(f"{path}: field 'dropout' should be in [0, 1), got {cfg.dropout}")
    return cfg, raw


def check_state_dict(tensors: dict, model: DiT, source: str) -> dict:
    """Map `backbone.*` tensors onto model's state-dict names; raise CheckpointError naming every
    missing, unexpected, wrong-shape or non-finite tensor."""
    expected = model.state_dict()
    mapped, unexpected = {}, []
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else None
        if name in expected:
            mapped[name] = value
        elif key not in OPTIONAL_KEYS:
            unexpected.append(key)
    missing = [PREFIX + k for k in expected if k not in mapped]
    wrong = [f"{PREFIX}{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
             for k, v in mapped.items() if v.shape != expected[k].shape]
    not_finite = [PREFIX + k for k, v in mapped.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    problems = [f"{what}: {', '.join(keys)}" for what, keys in
                [("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                 ("NaN or inf in", not_finite)] if keys]
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    inv_freq = "rotary_emb.inv_freq"
    if not torch.allclose(mapped[inv_freq].float(), expected[inv_freq], rtol=1e-6, atol=0):
        raise CheckpointError(f"{source}: {PREFIX}{inv_freq} differs from 1/10000^(2i/head_dim) "
                              "(a different rotary base or head size)")
    rank = mapped.get("output_layer.token_rank")
    if rank is not None and not torch.equal(rank.sort().values, torch.arange(len(rank))):
        raise CheckpointError(f"{source}: {PREFIX}output_layer.token_rank is not a permutation of the token ids")
    return {k: v.float() if v.is_floating_point() else v for k, v in mapped.items()}


def resolve(path_or_repo_id: str) -> Path:
    """A local folder as is; anything else is a hub repo id, downloaded with huggingface_hub.

    Raises CheckpointError when it is neither: a file, a missing folder, a repo the hub does not
    have or will not give, or a hub that cannot be reached (the message then says how to pass a
    local snapshot instead).
    """
    if os.path.isdir(path_or_repo_id):
        return Path(path_or_repo_id)
    if os.path.exists(path_or_repo_id):
        raise CheckpointError(f"{path_or_repo_id}: a file; "
                              f"expected a checkpoint folder ({CONFIG} + {WEIGHTS}) or a hub repo id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    try:
        return Path(snapshot_download(path_or_repo_id, allow_patterns=[CONFIG, WEIGHTS]))
    except HFValidationError:  # e.g. runs/ckpt/neg: not a repo id, so a folder that is not there
        raise CheckpointError(f"{path_or_repo_id}: no such checkpoint folder") from None
    except LocalEntryNotFoundError:  # no network (or HF_HUB_OFFLINE=1) and not in the local hub cache
        raise CheckpointError(
            f"{path_or_repo_id}: not a folder here, and the Hugging Face hub is unreachable; "
            f"on a machine with network run "
            f"`hf download {path_or_repo_id} {CONFIG} {WEIGHTS} --local-dir DIR`, copy DIR here and pass DIR instead "
            f"(train.py --init DIR, convert_hf.py --repo DIR)") from None
    except HfHubHTTPError as e:  # RepositoryNotFoundError, GatedRepoError, a server error
        raise CheckpointError(f"{path_or_repo_id}: not a folder here, and the Hugging Face hub refused it "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from None


def load_hf(path_or_repo_id: str = DEFAULT_REPO) -> DiT:
    """A DiT in eval mode, float32, from a checkpoint folder or a Hugging Face repo id.

    Raises CheckpointError (a ValueError) when the folder or repo cannot be had (see resolve), or
    config.json or model.safetensors is missing, unreadable or does not match the model; the
    message names the file and the keys.
    """
    folder = resolve(path_or_repo_id)
    cfg, _ = read_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: not found")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    model = DiT(cfg)
    model.load_state_dict(check_state_dict(tensors, model, str(weights)), strict=True)
    return model.eval()


def atomic_write(path: Path, write) -> None:
    """write(tmp_path), then rename over path, so a crash never leaves a half-written file. The file
    gets the permissions of a plain new file (0666 less the umask: 0644 usually), readable by
    colleagues on a shared disk (safetensors writes 0600)."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_checkpoint(state_dict: dict, cfg: DiTConfig, folder: str | Path, extra: dict | None = None) -> None:
    """Write `state_dict` (DiT names) as an HF-layout checkpoint folder that load_hf reads.

    config.json holds the DiTConfig fields plus `extra` (e.g. class label, training step).
    Each file is written to a temporary name and renamed; the weights go first, so a config.json
    never describes weights that are not there yet.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {PREFIX + k: v.detach().float().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write(folder / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    config = {**dataclasses.asdict(cfg), "model_type": "mdlm", **(extra or {})}
    atomic_write(folder / CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--repo", default=DEFAULT_REPO, help="hub repo id or local snapshot folder")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    args = p.parse_args()
    try:
        model = load_hf(args.repo)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    save_checkpoint(model.state_dict(), model.config, args.out, {"source": args.repo})
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {args.repo} -> {args.out} ({n / 1e6:.1f}M parameters, {len(model.state_dict())} tensors)")


if __name__ == "__main__":
    main()
