"""The MDLM diffusion transformer (DiT) backbone.

Same maths and tensor names as `models/dit.py` of kuleshov-group/mdlm (Sahoo et al. 2024, §5 /
App. B; the DiT of Peebles & Xie 2023 with adaLN conditioning and rotary embeddings, Su et al.
2021), so the Hugging Face checkpoint `kuleshov-group/mdlm-owt-noeos` loads by stripping the
`backbone.` prefix. Read top to bottom: config, time embedding, rotary, attention, block, final
layer, model.

The label as a token (n_classes = C > 0): a joint MDLM over (label, text). Every sequence (every
window of a long text) gets one extra position in front of its text, the label slot, holding one
of C label tokens or the masked label. The slot has its own embedding table (`label_embed`, C + 1
rows, the last the masked state) and its own output head (`label_head`, a C-way softmax), so the
text vocabulary, its embedding and its head stay exactly the Hugging Face layout: text positions
never predict a label, and the slot predicts only labels (SUBS's restriction of each position to
what it can hold, Sahoo et al. 2024 §3.2.1). The slot is context like any token (it is attended to
and attends), so a label changes p(text) through attention from the first layer, unlike the adaLN
class table it replaces (docs/label_token.md: that table learned the class slowly). Its rotary
position is 0 and the text's are 1..L; rotary scores depend on differences only, so the text's
relative geometry is that of the model without a slot. The label head starts at zero: a fresh
slot predicts the uniform distribution over the C labels.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import NEG_INFINITY

try:  # optional: the variable-length flash-attention kernel (needs CUDA to build)
    from flash_attn.flash_attn_interface import flash_attn_varlen_qkvpacked_func
except ImportError:
    flash_attn_varlen_qkvpacked_func = None


@dataclass
class DiTConfig:
    """Model hyper-parameters under the Hugging Face `MDLMConfig` field names."""
    vocab_size: int = 50258         # GPT-2's 50257 tokens + the mask token (mask_index = vocab_size - 1)
    model_length: int = 1024        # context length in tokens
    hidden_dim: int = 768
    cond_dim: int = 128             # width of the adaLN conditioning vector c
    n_blocks: int = 12
    n_heads: int = 12
    dropout: float = 0.1
    time_conditioning: bool = False  # False: the model is always given sigma = 0 (see diffusion.py)
    n_classes: int = 0               # C > 0: a label slot before the text (C label tokens + a masked label);
                                     # 0: the Hugging Face layout
    adaptive_head: int = 0           # S > 0: adaptive-softmax output head, S most frequent tokens in its head;
                                     # 0: a full Linear (HF)


PRESETS = {
    "small": DiTConfig(),  # = mdlm-owt-noeos, 169.6M parameters
    # CPU-sized: 2 blocks of width 128, 512 tokens (87% of IMDB reviews whole). Its adaptive head costs
    # ~1/12 of a full 50,258-way one (docs/speed.md); the 6.4M-entry embedding is most of its 8.2M parameters.
    "tiny": DiTConfig(model_length=512, hidden_dim=128, cond_dim=64, n_blocks=2, n_heads=4, adaptive_head=4096),
}

FREQ_EMBED_DIM = 256   # sinusoidal time-embedding width (hard-coded in the reference)
MLP_RATIO = 4
ROTARY_BASE = 10000.0


class TimestepEmbedder(nn.Module):
    """sigma [B] -> sinusoidal embedding [B, 256] (cos half first) -> MLP -> [B, cond_dim]."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_EMBED_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = FREQ_EMBED_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), rotate-half (GPT-NeoX) layout, on q and k."""

    def __init__(self, head_dim: int):
        super().__init__()
        # persistent, as in the reference: the checkpoint stores it and convert_hf.py checks it
        self.register_buffer("inv_freq", 1.0 / ROTARY_BASE ** (torch.arange(0, head_dim, 2).float() / head_dim))

    def forward(self, seq_len: int):
        """Returns cos, sin of shape [seq_len, head_dim] (float32) for positions 0..seq_len-1."""
        angles = torch.outer(torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32), self.inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, 2, H, D] (q and k): out = [x1 cos - x2 sin | x2 cos + x1 sin] with x = [x1 | x2], in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[:, None, None], sin[:, None, None]  # [L, 1, 1, D]
    return (x.float() * cos + rotated * sin).to(x.dtype)


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    """A precision this device cannot run (set_runtime)."""


def set_runtime(model: "DiT", precision: str = "auto", inference: bool = False) -> "DiT":
    """Choose how `model` runs on the device its weights are on; returns it.

    precision: "auto" (bf16 on a CUDA GPU that has it, as the reference trains; else fp32), "fp32",
    "bf16" or "fp16": the autocast dtype of the blocks and the output layer (LayerNorm, rotary and
    an adaptive head stay fp32).
    On CUDA with bf16/fp16 and flash-attn installed, attention takes flash-attn's variable-length
    kernel; otherwise PyTorch SDPA. inference=True also casts the blocks' nn.Linear weights to that
    dtype once, not in every forward (one way: the model then stays at that precision). Raises
    PrecisionError for an unknown precision, and for an explicit bf16 on a GPU without bf16
    support (e.g. V100, T4), naming fp16 and fp32 instead.
    """
    cuda = next(model.parameters()).is_cuda
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision {precision!r}: expected auto, {', '.join(PRECISIONS)}")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"this GPU ({torch.cuda.get_device_name()}) has no bf16; "
                             "pass --precision fp16 (inference) or fp32")
    model.precision = precision
    model.varlen_kernel = flash_attn_varlen_qkvpacked_func if cuda and precision != "fp32" else None
    if inference and precision != "fp32":  # what autocast would cast in every forward: the matmul weights
        adaptive = set(model.output_layer.adaptive.modules()) if model.config.adaptive_head else set()
        for m in model.modules():
            if isinstance(m, nn.Linear) and m not in adaptive:
                m.to(PRECISIONS[precision])
    return model


def unpad(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> tuple:
    """The packed layout of the variable-length kernel, computed once per forward: (indices of the
    real tokens in the flattened [B * L] batch, or None when there is no padding (no gather at all),
    cu_seqlens int32 [B + 1], max_seqlen int). attention_mask: bool [B, L] or None."""
    if attention_mask is None:
        return None, torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device), length
    lengths = attention_mask.sum(1, dtype=torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return attention_mask.flatten().nonzero()[:, 0], cu_seqlens, int(lengths.max())


def attention(qkv: torch.Tensor, attention_mask: torch.Tensor | None, packing: tuple | None = None,
              kernel=None) -> torch.Tensor:
    """Bidirectional softmax attention, scale 1/sqrt(head_dim).

    qkv: [B, L, 3, H, D] (rotary already applied to q and k). attention_mask: bool [B, L], True at
    real tokens, or None; padding keys are never attended to. Returns [B, L, H*D]. kernel: None
    for PyTorch SDPA on the padded batch, or a function with the signature of flash-attn's
    `flash_attn_varlen_qkvpacked_func(qkv [T, 3, H, D], cu_seqlens int32 [B + 1], max_seqlen int,
    dropout_p, causal=False) -> [T, H, D]` run on the real tokens only, laid out by `packing` (unpad).
    """
    B, L, _, H, D = qkv.shape
    if kernel is not None:
        indices, cu_seqlens, max_seqlen = packing
        flat = qkv.reshape(B * L, 3, H, D)
        out = kernel(flat if indices is None else flat[indices], cu_seqlens, max_seqlen, 0.0, causal=False)
        if indices is not None:  # back to [B * L]; padding rows get zeros (their outputs are never read)
            out = out.new_zeros(B * L, H, D).index_copy_(0, indices, out)
        return out.reshape(B, L, H * D)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, L, D]
    mask = None if attention_mask is None else attention_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, H * D)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero-style modulation and gates (DiT)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.hidden_dim
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        # the reference's weight-only LayerNorm, eps 1e-5; in fp32 under autocast:
        # its input, the residual stream, is fp32
        self.norm1 = nn.LayerNorm(dim, bias=False)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, MLP_RATIO * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(MLP_RATIO * dim, dim))
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * dim)

    def forward(self, x, c, cos, sin, attention_mask, packing=None, kernel=None):
        B, L, dim = x.shape
        modulation = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        head_dim = dim // self.n_heads
        qkv = self.attn_qkv(modulate(self.norm1(x), shift_msa, scale_msa)).view(B, L, 3, self.n_heads, head_dim)
        qk = apply_rotary(qkv[:, :, :2], cos, sin)  # v is not rotated
        qkv = torch.cat([qk, qkv[:, :, 2:]], dim=2)
        h = self.attn_out(attention(qkv, attention_mask, packing, kernel))
        # reference order: residual + gate * dropout(branch)
        x = x + gate_msa * F.dropout(h, self.dropout, self.training)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * F.dropout(h, self.dropout, self.training)


def max_adaptive_head(vocab_size: int) -> int:
    """The largest adaptive head S for a vocabulary: its clusters end at rank 4 S, which must stay
    below the vocab_size - 1 real tokens (the mask token has no entry)."""
    return (vocab_size - 2) // 4


def adaptive_cutoffs(cfg: DiTConfig) -> list[int]:
    """Cluster boundaries of the adaptive head, in frequency ranks: [S, 4S] (head: the S most
    frequent tokens; tail 1: ranks S..4S-1 at width hidden/4; tail 2: the rest at width hidden/16)."""
    return [cfg.adaptive_head, 4 * cfg.adaptive_head]


class FinalLayer(nn.Module):
    """adaLN (shift, scale), then the output head over the vocabulary.

    adaptive_head = 0: a Linear with bias to vocab_size logits (the Hugging Face layout).
    adaptive_head = S > 0: an adaptive softmax (Grave et al. 2017, "Efficient softmax approximation
    for GPUs", torch.nn.AdaptiveLogSoftmaxWithLoss): the S most frequent tokens and one entry per
    tail cluster share a small softmax; a token in a tail cluster pays the cluster's probability
    times its own softmax over the cluster, computed from a projection to a narrower width. It is
    exactly normalised over the vocab_size - 1 real tokens, and the mask token has no entry at all
    (SUBS's zero masking, Sahoo et al. 2024 §3.2.1). `token_rank` [vocab_size - 1] maps a token id
    to its frequency rank (train.py counts the training texts; the identity until then) and is
    saved with the weights.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.hidden_dim, bias=False)  # as DiTBlock.norm1
        self.vocab_size = cfg.vocab_size
        if cfg.adaptive_head:
            real = cfg.vocab_size - 1
            if not 0 < cfg.adaptive_head <= max_adaptive_head(cfg.vocab_size):
                raise ValueError(f"adaptive_head {cfg.adaptive_head}: 4 x it must be below the {real} real tokens")
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(cfg.hidden_dim, real, adaptive_cutoffs(cfg), div_value=4.0,
                                                          head_bias=True)
            self.register_buffer("token_rank", torch.arange(real))
        else:
            self.linear = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.hidden_dim)  # after the head: the reference's key order

    def features(self, x, c):
        """x [..., D] and c [..., cond_dim] with matching (broadcastable) leading dims -> [..., D]."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)

    def forward(self, x, c):
        """Logits [..., vocab_size]; the adaptive head's are its log-probabilities, NEG_INFINITY for the mask token."""
        h = self.features(x, c)
        if not hasattr(self, "adaptive"):
            return self.linear(h)
        with torch.autocast(h.device.type, enabled=False):  # fp32: its clusters' log-softmaxes are combined in place
            rows = h.reshape(-1, h.shape[-1]).float()
            log_p = self.adaptive.log_prob(rows)[:, self.token_rank]  # rank order -> id order
        log_p = torch.cat([log_p, log_p.new_full((len(log_p), 1), NEG_INFINITY)], -1)
        return log_p.view(*h.shape[:-1], self.vocab_size)

    def target_log_prob(self, x, c, targets):
        """SUBS at masked positions (diffusion.masked_log_probs, gathered at the targets; the only path
        that trains and scores): log p(targets) with the mask token excluded from the normaliser, computed
        over the real tokens' columns alone. x [N, D], c [N, cond_dim], targets long [N] real token ids
        -> float32 [N] (nats, <= 0). tests/test_head.py checks it equals masked_log_probs of the logits."""
        h = self.features(x, c)
        if hasattr(self, "adaptive"):
            with torch.autocast(h.device.type, enabled=False):
                return self.adaptive(h.float(), self.token_rank[targets]).output
        # the real tokens' columns only: softmax over them is SUBS's log-softmax with the mask's logit at -inf
        logits = F.linear(h, self.linear.weight[:-1], self.linear.bias[:-1]).float()
        return -F.cross_entropy(logits, targets, reduction="none")


class EmbeddingLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, input_ids):
        return self.embedding[input_ids]


class DiT(nn.Module):
    """The MDLM backbone: token ids x_t and noise level sigma -> logits over the vocabulary."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.hidden_dim % cfg.n_heads:
            raise ValueError(f"hidden_dim {cfg.hidden_dim} is not divisible by n_heads {cfg.n_heads}")
        self.config = cfg
        self.vocab_embed = EmbeddingLayer(cfg)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.hidden_dim // cfg.n_heads)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_blocks))
        self.output_layer = FinalLayer(cfg)
        if cfg.n_classes:  # the label slot: C labels + the masked label (row n_classes), and a C-way head
            self.label_embed = nn.Embedding(cfg.n_classes + 1, cfg.hidden_dim)
            nn.init.kaiming_uniform_(self.label_embed.weight, a=math.sqrt(5))  # the scale of the text embedding
            self.label_head = nn.Linear(cfg.hidden_dim, cfg.n_classes)
        self.precision, self.varlen_kernel = "fp32", None  # set_runtime chooses them for a device
        # adaLN-Zero initialisation (Peebles & Xie 2023): every block starts as the identity
        # (of the adaptive head only its head layer: a zero tail would get no gradient, a product of two zeros)
        head = self.output_layer.adaptive.head if cfg.adaptive_head else self.output_layer.linear
        label_head = [self.label_head] if cfg.n_classes else []  # uniform over the labels at the start
        for m in [b.adaLN_modulation for b in self.blocks] + [self.output_layer.adaLN_modulation, head] + label_head:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, sigma: torch.Tensor,
                attention_mask: torch.Tensor | None = None, output_mask: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                label_out: bool = False):
        """Raw logits (no SUBS), or the SUBS log-probabilities of given tokens; and the label slot's.

        input_ids: LongTensor [B, L], the text (a window of it), L <= model_length. sigma: FloatTensor
        [B], the noise level (diffusion.py passes zeros when time_conditioning is False).
        attention_mask: BoolTensor [B, L], True at real tokens; padding is never attended to, so
        outputs at real positions equal those of each sequence run alone. Pass None when there is
        no padding: SDPA then takes its fastest kernel and the varlen path gathers nothing (the
        forward does not check, which would cost a device-to-host sync). output_mask: BoolTensor
        [B, L] or None; when given, logits are computed only where it is True (the NELBO needs only
        masked positions; all False: none). class_labels: LongTensor [B], what the label slot holds:
        a label 0..n_classes-1, or n_classes = the masked label; None = masked for every row; must
        be None for a model without a slot (n_classes = 0). Raises ValueError otherwise.
        Returns float32 logits [B, L, vocab_size], or [N, vocab_size] for the N selected positions.
        targets: LongTensor [N] (needs output_mask), the clean tokens x0 at the N selected positions:
        then returns float32 [N], log p_theta(x0_i | x_t) under SUBS (Sahoo et al. 2024, Eq. 8: the
        softmax over the vocab_size - 1 real tokens), without ever building [N, vocab_size] log-probabilities.
        label_out=True (needs n_classes > 0): returns (that, label_log_probs), the latter float32
        [B, n_classes], log p_theta(label | x_t) at the slot: a log-softmax over the C labels only
        (meaningful where the slot is masked; SUBS carries an unmasked slot over).
        The blocks and output layer run under autocast to self.precision (set_runtime; fp32 = off).
        """
        if attention_mask is not None:
            assert attention_mask.dtype == torch.bool, ("attention_mask must be bool (True at real tokens), "
                                                        f"got {attention_mask.dtype}")
        if targets is not None and output_mask is None:
            raise ValueError("targets need output_mask: the positions they are the clean tokens of")
        C = self.config.n_classes
        if not C and (class_labels is not None or label_out):
            raise ValueError("class_labels / label_out given to a model without a label slot (n_classes = 0)")
        x = self.vocab_embed(input_ids)
        if C:  # the label slot, position 0 of every sequence
            if class_labels is None:
                class_labels = torch.full_like(input_ids[:, 0], C)
            x = torch.cat([self.label_embed(class_labels)[:, None].to(x.dtype), x], 1)
            if attention_mask is not None:
                attention_mask = F.pad(attention_mask, (1, 0), value=True)
        packing = unpad(attention_mask, *x.shape[:2], input_ids.device) if self.varlen_kernel is not None else None
        c = F.silu(self.sigma_map(sigma))
        cos, sin = self.rotary_emb(x.shape[1])
        dtype = PRECISIONS[self.precision]
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            for block in self.blocks:
                x = block(x, c, cos, sin, attention_mask, packing, self.varlen_kernel)
            if C:
                slot, x = x[:, 0], x[:, 1:]
            if output_mask is None:
                out = self.output_layer(x, c[:, None]).float()
            else:
                x, cm = x[output_mask], c[:, None].expand(-1, x.shape[1], -1)[output_mask]
                if targets is None:
                    out = self.output_layer(x, cm).float()
                elif len(targets) != len(x):
                    raise ValueError(f"targets: {len(targets)} tokens for {len(x)} selected positions")
                else:
                    out = self.output_layer.target_log_prob(x, cm, targets)
            if not label_out:
                return out
            label_logits = self.label_head(self.output_layer.features(slot, c))
        return out, label_logits.float().log_softmax(-1)
