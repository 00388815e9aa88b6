"""MDLM-ATAT: importance-aware adaptive masking with a curriculum, an optional training objective.

Plain MDLM (diffusion.py) masks every real token of x0 independently with the same probability
m = move_chance(t); train.py weights each masked token's cross-entropy by train_weight(t) (a
constant; the NELBO of Eq. 11, Sahoo et al. 2024, arXiv 2406.07524, weights it by loss_weight(t)):

    loss(x0) = E_t E_{x_t} [ sum over masked i of train_weight(t) * -log p_theta(x0_i | x_t) ]   (nats)

ATAT replaces the uniform masking rate by a per-token one, steered by how hard each token is to
reconstruct:

  * an importance estimator (ImportanceEstimator, a small transformer over x0) predicts each
    token's difficulty s_i in (0, 1), trained by regression (estimator_loss) on
    difficulty_target(nll) = min(nll_i / log(V - 1), 1), the MDLM's own per-token loss scaled so
    that 1 means "no better than a uniform guess over the V - 1 real tokens";
  * adaptive masking (tilted_move_chance, mask_with_scores) masks token i with probability
        p_i = m + lambda * min(m, 1 - m) * (s_i - mean_s) / max_j |s_j - mean_s|,
    mean and max over the row's real tokens, so the expected masking rate of a row stays m;
  * a three-phase curriculum (curriculum_tilt) sets the tilt lambda: -strength (easy tokens
    masked more) for the first phase, a linear ramp through the middle, +strength (hard tokens
    masked more) at the end;
  * importance weighting (token_weights) scales each masked token's term by train_weight(t) * m / p_i,
    so the loss stays on the plain step's scale (nats/token) and equals its weighting at lambda = 0.

This file holds only these pieces; train.py wires them into `--objective atat`. Validation,
eval.py, classify.py and every likelihood this project reports use the plain NELBO of diffusion.py
and never this module: the tilted process is a training device, not the model's likelihood.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from diffusion import move_chance, train_weight


# ---- the importance estimator ---------------------------------------------------------------
@dataclass
class EstimatorConfig:
    """Hyper-parameters of ImportanceEstimator.

    vocab_size: rows of the token embedding, the mask token included (the DiT's vocab_size, e.g.
    50,258 for GPT-2 + mask); width: model width (must be divisible by heads); layers: encoder
    layers; heads: attention heads; max_length: longest input in tokens (learned positions).
    """
    vocab_size: int
    width: int = 64
    layers: int = 2
    heads: int = 4
    max_length: int = 1024

    def __post_init__(self):
        if self.vocab_size < 1 or self.width < 1 or self.layers < 1 or self.heads < 1 or self.max_length < 1:
            raise ValueError(f"EstimatorConfig: every size must be >= 1, got {self}")
        if self.width % self.heads:
            raise ValueError(f"EstimatorConfig: width ({self.width}) must be divisible by heads ({self.heads})")


class ImportanceEstimator(nn.Module):
    """Predicts each token's reconstruction difficulty s_i in (0, 1) from the clean text x0.

    token embedding + learned position embedding -> pre-norm nn.TransformerEncoder (ReLU MLP of
    4 * width, no dropout) -> LayerNorm -> Linear(width, 1) -> sigmoid.
    With the defaults (width 64, 2 layers) and vocab_size 50,258 it has about 3.3M parameters,
    almost all in the token embedding.
    """

    def __init__(self, config: EstimatorConfig):
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(config.vocab_size, config.width)
        self.pos = nn.Embedding(config.max_length, config.width)
        layer = nn.TransformerEncoderLayer(config.width, config.heads, 4 * config.width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        # nested tensors are not used with norm_first anyway; saying so silences torch's warning
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, 1)

    def forward(self, x0: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Difficulty scores: float32 [B, L] in (0, 1).

        x0: long [B, L] clean token ids in [0, vocab_size); attention_mask: bool [B, L], True at
        real tokens, or None (all real). Padding keys are hidden from attention
        (src_key_padding_mask = ~attention_mask), so the scores of real tokens do not depend on
        what padding holds; the scores *at* padding are meaningless and callers ignore them (a row
        with no real token at all attends to its padding rather than to nothing, so it yields no NaN).
        Raises ValueError if L > config.max_length.
        """
        B, L = x0.shape
        if L > self.config.max_length:
            raise ValueError(f"ImportanceEstimator: input of {L} tokens is longer than "
                             f"max_length={self.config.max_length}")
        h = self.tok(x0) + self.pos(torch.arange(L, device=x0.device))[None]
        padding = None
        if attention_mask is not None:
            padding = ~attention_mask.bool() & attention_mask.any(1, keepdim=True)  # an all-padding row: no key hidden
        h = self.encoder(h, src_key_padding_mask=padding)
        return torch.sigmoid(self.head(self.norm(h)).squeeze(-1)).float()


def difficulty_target(nll: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The estimator's regression target: min(nll / log(vocab_size - 1), 1), clamped to [0, 1], detached.

    nll: float [B, L], the per-token -log p_theta(x0_i | x_t) in nats at masked positions (0
    elsewhere; callers select the masked positions, see estimator_loss). log(vocab_size - 1) is the
    nll of a uniform guess over the vocab_size - 1 real tokens (the mask token, last id, is never a
    candidate under SUBS), so a target of 1 means "no better than a uniform guess" and 0 a
    certain, correct prediction. Returns float32 [B, L] with no gradient.
    Raises ValueError if vocab_size < 3 (fewer than two real tokens: log(vocab_size - 1) <= 0).
    """
    if vocab_size < 3:
        raise ValueError(f"difficulty_target: vocab_size must be >= 3 (two real tokens and the mask), got {vocab_size}")
    return (nll.detach().float() / math.log(vocab_size - 1)).clamp(0.0, 1.0)


def estimator_loss(scores: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the estimator over the masked positions: float32 scalar.

    scores: float [B, L] (ImportanceEstimator output, with gradient); target: float [B, L]
    (difficulty_target, detached here anyway); masked: bool [B, L], the positions whose nll was
    observed (False at padding). loss = sum over masked (s_i - target_i)^2 / max(#masked, 1): 0,
    with a zero gradient, when nothing is masked. Values at unmasked positions are never read, so
    NaN or garbage there reaches neither the loss nor the gradient. No host sync.
    """
    diff = torch.where(masked, scores.float() - target.detach().float(), 0.0)  # where, not indexing: no host sync
    return (diff * diff).sum() / masked.sum().clamp(min=1)


# ---- the curriculum --------------------------------------------------------------------------
def curriculum_tilt(step: int, max_steps: int, phases: tuple[float, float] = (0.3, 0.7),
                    strength: float = 0.5) -> float:
    """The tilt lambda at an optimizer step (step = optimizer steps already taken, 0 at the first).

    With f = step / max_steps:
        f <  phases[0]              lambda = -strength   (easy phase: low-score tokens masked more)
        phases[0] <= f < phases[1]  lambda = -strength + 2 strength (f - phases[0]) / (phases[1] - phases[0])
        f >= phases[1]              lambda = +strength   (hard phase: high-score tokens masked more)
    Returns a Python float in [-strength, strength], non-decreasing in step.
    Raises ValueError unless max_steps >= 1, step >= 0, 0 <= phases[0] <= phases[1] <= 1 and
    0 <= strength <= 1.
    """
    if max_steps < 1:
        raise ValueError(f"curriculum_tilt: max_steps must be >= 1, got {max_steps}")
    if step < 0:
        raise ValueError(f"curriculum_tilt: step must be >= 0, got {step}")
    if len(phases) != 2 or not 0 <= phases[0] <= phases[1] <= 1:
        raise ValueError(f"curriculum_tilt: phases must be two fractions 0 <= a <= b <= 1, got {tuple(phases)}")
    if not 0 <= strength <= 1:
        raise ValueError(f"curriculum_tilt: strength must be in [0, 1], got {strength}")
    f = step / max_steps
    if f < phases[0]:
        return -float(strength)
    if f >= phases[1]:
        return float(strength)
    return -strength + 2 * strength * (f - phases[0]) / (phases[1] - phases[0])


# ---- adaptive masking and importance weights --------------------------------------------------
def tilted_move_chance(t: torch.Tensor, scores: torch.Tensor, attention_mask: torch.Tensor | None,
                       tilt: float) -> torch.Tensor:
    """Per-token masking probabilities of the tilted forward process: float32 [B, L].

    t: float [B] (float32, as diffusion.antithetic_t draws it); scores: float [B, L], the
    estimator's s_i (detached here: the masking is discrete, no gradient flows through it; values
    at padding are never read); attention_mask: bool [B, L], True at real tokens, or None (all
    real); tilt: lambda in [-1, 1]. With m = move_chance(t) of the row,

        p_i = m + lambda * min(m, 1 - m) * (s_i - mean_s) / max_j |s_j - mean_s|,

    mean and max over the row's real tokens; p_i = m for a row whose real tokens all have the same
    score; p_i = 0 at padding. Then
      (a) 0 <= p_i <= 1, since |lambda (s_i - mean_s) / max_j| <= 1 and m +- min(m, 1 - m) is in [0, 1];
          moreover p_i >= (1 - |lambda|) m, so the importance weight m / p_i <= 1 / (1 - |lambda|);
      (b) the mean of p over a row's real tokens is m (the deviations s_i - mean_s sum to 0), up
          to float rounding: the expected masking rate at each t stays move_chance(t);
      (c) lambda = 0 gives p_i == m bit for bit, so `u < p` is exactly the plain `u < m[:, None]`.
    The row statistics are computed in float64 (a constant row is detected as such, not as a row
    of rounding-error deviations). m is computed on t's device, as the plain objective computes
    it, and the result is on scores' device.
    Raises ValueError if |tilt| > 1 or the shapes disagree.
    """
    if not -1 <= tilt <= 1:
        raise ValueError(f"tilted_move_chance: tilt must be in [-1, 1], got {tilt}")
    if scores.dim() != 2 or t.shape != scores.shape[:1] or (attention_mask is not None
                                                            and attention_mask.shape != scores.shape):
        raise ValueError(f"tilted_move_chance: expected t [B], scores [B, L], attention_mask [B, L]; got "
                         f"{tuple(t.shape)}, {tuple(scores.shape)}, "
                         f"{None if attention_mask is None else tuple(attention_mask.shape)}")
    device = scores.device
    m32 = move_chance(t).float().to(device)  # on t's device, as in diffusion.mask_positions
    real = torch.ones_like(scores, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
    m = m32.double()[:, None]
    s = torch.where(real, scores.detach().double(), 0.0)  # padding's (meaningless, maybe NaN) scores never read
    n = real.sum(1, keepdim=True).clamp(min=1)
    mean = s.sum(1, keepdim=True) / n
    dev = torch.where(real, s - mean, 0.0)
    smax = torch.where(real, s, -math.inf).amax(1, keepdim=True)
    smin = torch.where(real, s, math.inf).amin(1, keepdim=True)
    constant = ~(smax > smin)  # all real scores equal (or no real token): p = m
    scale = dev.abs().amax(1, keepdim=True)
    r = torch.where(constant, 0.0, dev / torch.where(constant, 1.0, scale))  # in [-1, 1], mean 0 over real tokens
    p = (m + tilt * torch.minimum(m, 1 - m) * r).clamp(0.0, 1.0)  # tilt 0: m + 0 == m exactly
    return torch.where(real, p, 0.0).float()


def token_weights(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Loss weight of each masked token: w_i = train_weight(t) * m / p_i, float32 [B, L].

    t: float [B]; p: float [B, L], the masking probabilities of tilted_move_chance (on p's
    device). m = move_chance(t). Where p_i = 0 (padding, or a token the tilt never masks) w_i = 0:
    no division by zero, no NaN or inf.

    Inverse-propensity weighting: token i is masked with probability p_i instead of m, so
    E[1{masked_i} w_i] = train_weight(t) * m, and each token's own term keeps its expectation under
    train.py's plain step, train_weight(t) * m * E[-log p_theta(x0_i | x_t) | i masked].
    This is NOT an unbiased estimate of the NELBO when tilt != 0: the training loss
    sum_i 1{masked_i} w_i * -log p_theta(x0_i | x_t) conditions each term on a context x_t drawn
    from the tilted process (the *other* tokens are masked at tilted rates), so
    E[-log p_theta(x0_i | x_t) | i masked] itself differs from the plain one. The correction keeps
    the loss on the plain step's scale (nats/token), so training curves of the two objectives are
    comparable, and at tilt 0 (p_i == m) w_i is exactly the plain step's weight train_weight(t)
    (diffusion.py). With |tilt| <= strength < 1, w_i <= train_weight(t) / (1 - strength) (tilted_move_chance (a)).
    """
    m = move_chance(t).float().to(p.device)[:, None]
    lw = train_weight(t).float().to(p.device)[:, None]
    positive = p > 0
    ratio = m / torch.where(positive, p.float(), 1.0)  # m / m == 1 exactly at tilt 0
    return torch.where(positive, lw * ratio, 0.0)


def mask_with_scores(t: torch.Tensor, scores: torch.Tensor, attention_mask: torch.Tensor | None, tilt: float,
                     u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tilted forward process: masked bool [B, L] and p float32 [B, L] (tilted_move_chance).

    t, scores, attention_mask, tilt: as tilted_move_chance; u: float [B, L] uniforms in [0, 1),
    the caller's, e.g. `torch.rand(attention_mask.shape, generator=g)` on the CPU, the same draws
    the plain objective (diffusion.mask_positions) would use, so the random stream, and with it
    --resume, is unchanged. masked = (u < p) & attention_mask, on scores' device; padding is never
    masked. At tilt 0 masked equals the plain `(u < move_chance(t)[:, None]) & attention_mask`.
    Raises ValueError as tilted_move_chance, or if u's shape is not [B, L].
    """
    if u.shape != scores.shape:
        raise ValueError(f"mask_with_scores: u must have the shape of scores {tuple(scores.shape)}, "
                         f"got {tuple(u.shape)}")
    p = tilted_move_chance(t, scores, attention_mask, tilt)
    masked = u.to(p.device) < p
    if attention_mask is not None:
        masked &= attention_mask.to(p.device).bool()
    return masked, p
