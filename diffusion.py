"""The MDLM objective: absorbing-state ("masking") diffusion with the SUBS parameterisation.

Sahoo et al., "Simple and Effective Masked Diffusion Language Models", NeurIPS 2024
(arXiv 2406.07524). Equation numbers below refer to that paper.

Forward process (§3.1, Eq. 2 with alpha_t = exp(-sigma(t))): each real token of x0 is replaced by
the mask token independently with probability move_chance(t) = 1 - alpha_t. The continuous-time
NELBO (§3.3, Eq. 10-11) is a weighted masked-language-modelling loss:

    NELBO(x0) = E_t E_{x_t ~ q(.|x0)} [ sum over masked positions i of
                  sigma'(t) / expm1(sigma(t)) * -log p_theta(x0_i | x_t) ]       (nats)

which upper-bounds -log p_theta(x0). With the loglinear schedule the weight is exactly 1/t.
Padding is never masked, never scored, and (model.py) never attended to.

The label as a token (model.py, n_classes = C): a model over (label, text) has a label slot in
front of every sequence, noised like any token, so its NELBO (joint_nelbo) bounds
-log p(label, text); clamping the slot to c bounds -log p(text | c) (nelbo with class_labels), and
the denoiser at a masked slot with the text clean is p(label | text) in one pass (label_posterior).

Read top to bottom: the noise schedule, the forward process (draws of t and x_t), the SUBS
parameterisation, the NELBO, the label slot. The reverse process (ancestral sampling) is in sample.py.
"""
import numpy as np
import torch

EPS = 1e-3           # loglinear schedule: move_chance(1) = 1 - EPS
SAMPLING_EPS = 1e-3  # t is drawn from [SAMPLING_EPS, 1]
NEG_INFINITY = -1e6  # the reference's finite "-inf" for SUBS (keeps logsumexp free of NaNs)


# ---- loglinear noise schedule (§3.4 / App. E.1) -------------------------------------------
def sigma(t: torch.Tensor) -> torch.Tensor:
    """Total noise sigma(t) = -log(1 - (1 - eps) t); t in [0, 1], any shape, float."""
    return -torch.log1p(-(1 - EPS) * t)


def dsigma(t: torch.Tensor) -> torch.Tensor:
    """Rate sigma'(t) = (1 - eps) / (1 - (1 - eps) t)."""
    return (1 - EPS) / (1 - (1 - EPS) * t)


def move_chance(t: torch.Tensor) -> torch.Tensor:
    """Probability that a token is masked at time t: 1 - alpha_t = 1 - exp(-sigma(t)) = (1 - eps) t."""
    return -torch.expm1(-sigma(t))


def loss_weight(t: torch.Tensor) -> torch.Tensor:
    """NELBO weight sigma'(t) / expm1(sigma(t)) of Eq. 11 (= alpha'_t / (1 - alpha_t) up to sign; = 1/t here)."""
    return dsigma(t) / torch.expm1(sigma(t))


def train_weight(t: torch.Tensor) -> torch.Tensor:
    """The training loss's weight per masked token (train.py): the constant 1 / E_t[move_chance(t)]
    (t ~ U[SAMPLING_EPS, 1]; ~2), in place of the NELBO's loss_weight(t) = 1/t. float [B] like t.

    Every t's denoising cross-entropy is then weighted by its expected number of masked tokens, a
    weighted diffusion loss in the sense of Kingma & Gao 2023 ("Understanding diffusion objectives as
    the ELBO with simple data augmentation"): for a model that can represent it, its minimiser is the
    NELBO's (the true p(x0_i | x_t) at every t), and for a context-free model its value is the NELBO's.
    Its gradient has no 1/t spikes: with 16 texts per step the 1/t weight's few low-t tokens carry most
    of the gradient, and a 2-block model sat at the unigram plateau (docs/lm_plateau.md). The NELBO
    (Eq. 11) remains what validation, eval.py and classify.py report."""
    return torch.full_like(t, 2 / ((1 - EPS) * (1 + SAMPLING_EPS)))


# ---- sampling t and x_t --------------------------------------------------------------------
def antithetic_t(n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """n times in [SAMPLING_EPS, 1], one per row, stratified: u_i = (r + i/n) mod 1 with one r ~ U(0,1).

    Antithetic (low-discrepancy) sampling of §3.5: the n draws cover [0, 1) evenly, which
    lowers the variance of the batch NELBO estimate. Returns float32 [n].
    """
    r = torch.rand(1, generator=generator)
    u = (r + torch.arange(n) / n) % 1
    return ((1 - SAMPLING_EPS) * u + SAMPLING_EPS).to(device)


def mask_positions(t: torch.Tensor, attention_mask: torch.Tensor | None, generator: torch.Generator | None = None,
                   u: torch.Tensor | None = None) -> torch.Tensor:
    """Forward process q(x_t | x0): bool [B, L], True where the token is masked.

    t: float [B]; attention_mask: bool [B, L] (True at real tokens), or None with u given (no padding).
    A real token is masked with probability move_chance(t), where its uniform u < move_chance(t);
    padding never is. u: float [B, L], or None to draw it from `generator` on the CPU (the same
    draws on any device) and move it to attention_mask's device.
    """
    if u is None:
        u = torch.rand(attention_mask.shape, generator=generator).to(attention_mask.device)
    masked = u < move_chance(t).to(u.device)[:, None]
    return masked if attention_mask is None else masked & attention_mask


def draw_seed(seed: int, *keys: int) -> int:
    """The 32-bit seed of one unit of randomness: a training micro-batch (keys: its index) or a scored
    text's window (keys: text index, window, round), under the run's seed. Mixed by numpy's
    SeedSequence, so that nearby keys give unrelated streams and every key counts: torch's CPU
    generator keeps only the low 32 bits of a seed (an offset such as window * 2**40 would vanish)."""
    return int(np.random.SeedSequence([seed % 2**32, *keys]).generate_state(1)[0])


def per_text_draws(lengths: list[int], k: int, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K Monte-Carlo draws of (t, masked positions) per text, from that text's own seed.

    lengths: token count of each of the N texts; seeds: one int per text. The K times of a text
    are antithetic. The draws depend only on (seed, length, k), never on the batch the text is in,
    and scoring every class model with the same draws gives common random numbers.
    Returns t float32 [N*K] and masked bool [N*K, max(lengths)] (row n*K + j is draw j of text n).
    """
    L = max(lengths)
    ts, masks = [], []
    for n, s in zip(lengths, seeds):
        g = torch.Generator().manual_seed(s)
        t = antithetic_t(k, g)
        m = torch.zeros(k, L, dtype=torch.bool)
        m[:, :n] = torch.rand(k, n, generator=g) < move_chance(t)[:, None]
        ts.append(t)
        masks.append(m)
    return torch.cat(ts), torch.cat(masks)


def per_text_count_draws(lengths: list[int], k: int, seeds: list[int]) -> torch.Tensor:
    """K draws of a masked set per text for nelbo_count: masked bool [N*K, max(lengths)].

    For a text of n tokens the K numbers of masked tokens are stratified over 1..n
    (k_j = floor(n u_j) + 1 with u_j = (r + j/K) mod 1, one r ~ U(0, 1): each k_j is uniform on
    1..n, and together they cover the range evenly), and the k_j positions are a uniformly random
    subset. Seeded per text as per_text_draws (same rows, same common-random-numbers property).
    """
    L = max(lengths)
    masks = []
    for n, s in zip(lengths, seeds):
        g = torch.Generator().manual_seed(s)
        u = (torch.rand(1, generator=g) + torch.arange(k) / k) % 1
        counts = (u * n).long().clamp(max=n - 1) + 1
        rank = torch.rand(k, n, generator=g).argsort(1).argsort(1)  # a random order of the n positions
        m = torch.zeros(k, L, dtype=torch.bool)
        m[:, :n] = rank < counts[:, None]
        masks.append(m)
    return torch.cat(masks)


# ---- SUBS parameterisation and the NELBO ----------------------------------------------------
def masked_log_probs(logits: torch.Tensor, mask_index: int) -> torch.Tensor:
    """SUBS at a masked position: log-softmax with the mask token's logit pushed to NEG_INFINITY
    ("zero masking probabilities", §3.2.1). logits float [..., V] -> log-probabilities [..., V]."""
    bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    bias[mask_index] = NEG_INFINITY
    return (logits + bias).log_softmax(-1)


def subs_log_probs(logits: torch.Tensor, xt: torch.Tensor, mask_index: int) -> torch.Tensor:
    """SUBS parameterisation (§3.2.1, Eq. 8): log p_theta(x0 | x_t) at every position, as the
    reference computes it (the parity test compares the two). Training and scoring apply the same
    SUBS without the carry-over positions: only masked positions are scored (nelbo's output_mask),
    and model.FinalLayer.target_log_prob is masked_log_probs gathered at the targets.

    logits: float [..., V]; xt: long [...]. Masked positions: masked_log_probs. Unmasked positions
    ("carry-over unmasking"): a point mass on the observed token (log prob 0, every other entry
    NEG_INFINITY). Returns float log-probabilities [..., V].
    """
    point_mass = torch.full_like(logits, NEG_INFINITY).scatter_(-1, xt[..., None], 0.0)
    return torch.where((xt != mask_index)[..., None], point_mass, masked_log_probs(logits, mask_index))


def model_sigma(model, t: torch.Tensor) -> torch.Tensor:
    """The sigma the backbone receives: sigma(t), or zeros for time_conditioning=False (the released model)."""
    return sigma(t) if model.config.time_conditioning else torch.zeros_like(t)


def nelbo(model, x0: torch.Tensor, t: torch.Tensor, masked: torch.Tensor,
          attention_mask: torch.Tensor | None = None, class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Continuous-time NELBO per sequence, one draw of (t, x_t) (Eq. 11), in nats.

    x0: long [B, L] clean tokens; t: float [B]; masked: bool [B, L] positions replaced by the mask
    token (must be False at padding); attention_mask: bool [B, L] or None (all real);
    class_labels: long [B] or None, what the label slot of a model with one holds (model.DiT): a label
    clamps it (never masked, so it adds nothing: the NELBO of the text given the label), n_classes or
    None keeps it masked and unscored (the NELBO of the text alone, the label unknown).
    Returns float32 [B]: sum over masked positions of loss_weight(t) * -log p_theta(x0_i | x_t).
    Unmasked positions contribute exactly 0 under SUBS, so logits are computed only where masked.
    Divide by the number of real tokens for nats/token.
    """
    nll = token_nll(model, x0, masked, model_sigma(model, t), attention_mask, class_labels)
    return weighted_sum(nll, masked, loss_weight(t)[:, None])


def nelbo_count(model, x0: torch.Tensor, masked: torch.Tensor, attention_mask: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The NELBO estimated through the *number* of masked tokens, in nats, float32 [B].

    With the masked set M drawn as k ~ Uniform{1..n} and then k of the n real tokens uniformly
    (per_text_count_draws), the estimate is (n / k) * sum over i in M of -log p_theta(x0_i | x_M).
    Its expectation is the eps -> 0 limit of Eq. 11: under q, P(|M| = k) = C(n, k) t^k (1 - t)^(n-k),
    and the integral over t of (1/t) C(n, k) t^k (1 - t)^(n-k) is C(n, k) B(k, n - k + 1) = 1/k, so
    NELBO = sum_k (1/k) E[sum over M of -log p | |M| = k] = E_k[(n/k) ...] with P(k) = 1/n (the
    likelihood estimator of LLaDA, Nie et al. 2025, Eq. 14). No 1/t weight can explode: n/k <= n.
    The model is not given t, so it must not be time-conditioned (the released model is not).
    Arguments as nelbo; each row needs at least one masked token. Raises ValueError for a
    time-conditioned model.
    """
    if model.config.time_conditioning:
        raise ValueError("the count estimator needs a model without time conditioning "
                         "(its output must not depend on t)")
    n = torch.full(masked.shape[:1], masked.shape[1],
                   device=masked.device) if attention_mask is None else attention_mask.sum(1)
    weight = (n / masked.sum(1)).float()
    nll = token_nll(model, x0, masked, torch.zeros_like(weight), attention_mask, class_labels)
    return weighted_sum(nll, masked, weight[:, None])


def token_nll(model, x0: torch.Tensor, masked: torch.Tensor, sigma_in: torch.Tensor,
              attention_mask: torch.Tensor | None = None, class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """-log p_theta(x0_i | x_t) (SUBS) at every masked position, 0 elsewhere: float32 [B, L], nats.

    x_t is x0 with the mask token at `masked`; sigma_in: float [B], the noise level the backbone
    is given (model_sigma); other arguments as nelbo. The model returns log-probabilities of the
    targets at the masked positions only (model.DiT `targets=`), scattered back onto the grid.
    """
    mask_index = model.config.vocab_size - 1
    xt = torch.where(masked, mask_index, x0)
    log_p = model(xt, sigma_in, attention_mask, output_mask=masked, class_labels=class_labels,
                  targets=x0[masked])  # [N]
    return torch.zeros(masked.shape, device=x0.device).masked_scatter(masked, -log_p)


def weighted_sum(nll: torch.Tensor, masked: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum over the masked positions of weight * nll, per row: float32 [B]. weight: [B, 1] or [B, L].
    A plain row sum, deterministic on every device (index_add_ would use atomics on CUDA); a row
    with nothing masked gives 0, whatever its weight."""
    return torch.where(masked, nll * weight, 0.0).sum(1)


# ---- the label slot (model.py, n_classes = C) -------------------------------------------------
def joint_nelbo(model, x0: torch.Tensor, t: torch.Tensor, masked: torch.Tensor, attention_mask: torch.Tensor | None,
                labels: torch.Tensor, slot_masked: torch.Tensor, readout: torch.Tensor | None = None,
                weight: torch.Tensor | None = None):
    """NELBO of (label, text) per sequence, one draw of (t, x_t), in nats: Eq. 11 over L + 1 positions.

    The label slot is one more token of x0, masked with the same move_chance(t) as the text
    (slot_masked, bool [B], drawn by the caller) and scored like one: the term
    loss_weight(t) * -log p_theta(label | x_t) where it is masked. labels: long [B], 0..C-1, or C for
    an unlabeled text, whose slot is always masked and never scored (it then trains p(text) with
    the label marginalised out). Other arguments as nelbo. Returns float32 [B] (text + slot terms).
    The upper bound is on -log p(label, text) for a labeled text, on -log p(text) for an unlabeled one.
    weight: float [B], each masked position's weight (default loss_weight(t), the NELBO; training
    passes train_weight(t)).

    readout: bool [B] or None, the rows (R of them) whose clean text is also read under a masked slot
    (label_posterior), for train.step_backward's label term. Their clean copies ride along as R more
    rows, so the model is called once (as DDP needs). Then returns (the float32 [B] above, float32
    [R, C] log p_theta(c | x0) of the readout rows in batch order).
    """
    C = model.config.n_classes
    scored = slot_masked & (labels < C)
    slot = torch.where(slot_masked | (labels >= C), C, labels)
    mask_index = model.config.vocab_size - 1
    xt, sigma_in = torch.where(masked, mask_index, x0), model_sigma(model, t)
    if readout is not None:  # the readout rows' clean texts under a masked slot, no text position scored
        xt, slot = torch.cat([xt, x0[readout]]), torch.cat([slot, torch.full_like(slot[readout], C)])
        sigma_in = torch.cat([sigma_in, model_sigma(model, torch.zeros_like(t[readout]))])
        attention_mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask[readout]])
        output_mask = torch.cat([masked, torch.zeros_like(masked[readout])])
    else:
        output_mask = masked
    log_p, label_log_p = model(xt, sigma_in, attention_mask, output_mask=output_mask, class_labels=slot,
                               targets=x0[masked], label_out=True)
    nll = torch.zeros(masked.shape, device=x0.device).masked_scatter(masked, -log_p)
    weight = loss_weight(t) if weight is None else weight
    B = len(x0)
    slot_nll = -label_log_p[:B].gather(1, labels.clamp(max=C - 1)[:, None])[:, 0]
    total = weighted_sum(nll, masked, weight[:, None]) + torch.where(scored, weight * slot_nll, 0.0)
    return total if readout is None else (total, label_log_p[B:])


def label_posterior(model, x0: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p_theta(c | text) for every label c, from one forward pass: float32 [B, C], rows logsumexp to 0.

    The slot is masked and the text x0 (long [B, L]) clean. In absorbing diffusion the denoiser at a
    masked position given the unmasked ones is the model's conditional of that token given them
    (Sahoo et al. 2024 §3.2: under SUBS x_theta(x_t) estimates E[x0 | x_t], a distribution over the
    clean token; Ou et al. 2024, "Your absorbing discrete diffusion secretly models the conditional
    distributions of clean data", Thm. 1), so here it reads p(label | text) directly: no
    Monte-Carlo draws. attention_mask: bool [B, L] or None (no padding)."""
    empty = torch.zeros_like(x0, dtype=torch.bool)
    sigma_in = model_sigma(model, torch.zeros(len(x0), device=x0.device))
    return model(x0, sigma_in, attention_mask, output_mask=empty, targets=x0[empty], label_out=True)[1]
