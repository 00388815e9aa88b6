"""The scoring engine: the class scores of texts under MDLMs, window by window, batch by batch.

score_draws: the NELBO of every text under every scorer (one DiT per class, or one joint DiT with
its label slot clamped to each class), per Monte-Carlo draw, the same draws for every class
(common random numbers; estimator "time", diffusion.nelbo, or "count", diffusion.nelbo_count);
score_texts: their mean over the draws. score_posterior: the one-pass readout log p(c | text) of a
model with a label slot (diffusion.label_posterior). score_sequential: rounds of draws, a text
stopping once its paired margin (paired_margin) is clear. A text longer than model_length is scored
whole, in disjoint windows (data.windows); under torchrun each rank scores every world-th batch and
the results are summed across ranks (score_windows).

Imported by classify.py (its readouts), train.py (validation), eval.py (perplexity bounds),
variance.py and bench.py; it imports none of them. Read top to bottom: the per-draw NELBOs, the
one-pass posterior, the batching they share, sequential scoring and the margin it stops on.
"""
import numpy as np
import torch
import torch.distributed as dist

from cli import progress as progress_bar  # the flag `progress` turns it on
import data
import diffusion

ESTIMATORS = ("time", "count")  # diffusion.nelbo (the default: the lower measured variance at K = 4 on IMDB, README)
                                # and diffusion.nelbo_count


@torch.inference_mode()
def score_draws(models: list, token_lists: list[list[int]], k: int, seed: int, batch_size: int, device,
                class_labels: list | None = None, estimator: str = "time", progress: bool = False,
                index: list[int] | None = None, stream: int = 0) -> np.ndarray:
    """NELBO of every text under every scorer, per Monte-Carlo draw, in nats: float64 [N, C, K].

    models: C scorers (one DiT per class, or one conditional DiT repeated C times); class_labels:
    None, or C entries (int class label for a conditional model, None for "no class" / an
    unconditional model). estimator: "time" (diffusion.nelbo with per_text_draws, Eq. 11) or
    "count" (diffusion.nelbo_count with per_text_count_draws). The mean over the last axis is the K-draw
    NELBO estimate. token_lists: N non-empty lists of token ids, of any length. A text longer than
    model_length is split into disjoint windows (data.windows); its draw j is the sum of its windows'
    draws j. Window w of text i uses the draws of diffusion.draw_seed(seed, index[i], w, stream) for every
    scorer (common random numbers), whatever batch it lands in; index (default 0..N-1) names the
    texts, stream numbers independent sets of K draws (score_sequential's rounds). batch_size counts texts
    (windows) per forward pass, each with its k draws: a forward holds batch_size x k sequences. Under
    torchrun each rank scores every world-th batch and the results are summed across ranks. Raises
    ValueError for an unknown estimator (and, from nelbo_count, for a time-conditioned model).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator {estimator!r}: expected one of {', '.join(ESTIMATORS)}")
    class_labels = class_labels or [None] * len(models)
    max_len = models[0].config.model_length

    def forward(x0, attention_mask, lengths, where):  # a batch of windows, each with its k draws -> [B, C, k]
        seeds = [diffusion.draw_seed(seed, i if index is None else int(index[i]), w, stream) for i, w in where]
        x0 = x0.repeat_interleave(k, 0).to(device)
        # on the CPU, where it costs no device sync: a batch without padding needs no mask (model.DiT)
        attention_mask = None if attention_mask.all() else attention_mask.repeat_interleave(k, 0).to(device)
        if estimator == "count":
            masked = diffusion.per_text_count_draws(lengths, k, seeds).to(device)
        else:
            t, masked = diffusion.per_text_draws(lengths, k, seeds)
            t, masked = t.to(device), masked.to(device)
        per_window = np.zeros((len(where), len(models), k))
        for c, (model, label) in enumerate(zip(models, class_labels)):
            labels = None if label is None else torch.full((len(x0),), label, dtype=torch.long, device=device)
            if estimator == "count":
                out = diffusion.nelbo_count(model, x0, masked, attention_mask, labels)
            else:
                out = diffusion.nelbo(model, x0, t, masked, attention_mask, labels)
            per_window[:, c] = out.view(len(where), k).double().cpu().numpy()
        return per_window

    return score_windows(token_lists, max_len, batch_size, device, progress, (len(models), k), forward)[0]


@torch.inference_mode()
def score_posterior(model, token_lists: list[list[int]], batch_size: int, device, log_prior: np.ndarray | None = None,
                    progress: bool = False) -> np.ndarray:
    """The one-pass posterior readout of a model with a label slot: log p(c | text), float64 [N, C], nats.

    Each window w of a text (data.windows) gets one forward pass with the label slot masked and its
    tokens clean, giving log p(c | w) (diffusion.label_posterior). A text of n windows combines them
    as if the windows were independent given the label (naive Bayes over windows):
        log p(c | w_1..w_n) = sum_w log p(c | w) - (n - 1) log prior(c) + const,
    normalised over c (one window: its own posterior). log_prior: float [C], the training labels'
    log-frequencies (None: uniform, where the correction is a constant). batch_size: windows per
    forward pass. Under torchrun each rank scores every world-th batch and the results are summed.
    """
    C = model.config.n_classes
    log_prior = np.zeros(C) if log_prior is None else np.asarray(log_prior, dtype=np.float64)

    def forward(x0, attention_mask, lengths, where):  # one pass per window -> log p(c | window) [B, C]
        attention_mask = None if attention_mask.all() else attention_mask.to(device)  # checked on the CPU: no sync
        return diffusion.label_posterior(model, x0.to(device), attention_mask).double().cpu().numpy()

    out, owners = score_windows(token_lists, model.config.model_length, batch_size, device, progress, (C,), forward)
    n_windows = np.bincount(owners, minlength=len(token_lists))
    out -= (n_windows - 1)[:, None] * log_prior[None]
    return out - np.logaddexp.reduce(out, axis=1, keepdims=True)


def score_windows(token_lists: list[list[int]], max_len: int, batch_size: int, device, progress: bool,
                  shape: tuple[int, ...], forward) -> tuple[np.ndarray, list[int]]:
    """What score_draws and score_posterior share: every text's windows (data.windows, max_len tokens at
    most) scored in batches of similar length, and summed per text.

    Window w of text i is scored in a batch of batch_size windows (data.length_batches) by
    forward(x0, attention_mask, lengths, where) -> float [B, *shape]: x0 and attention_mask the
    batch padded on the CPU (data.collate), lengths its windows' token counts, where their
    (i, w). Under torchrun each rank scores every world-th batch and the results are summed across
    ranks, so every rank holds them all. Returns (float64 [N, *shape], the sum over each text's
    windows; owners, the text i of every window, in order).
    """
    pieces, where = [], []
    for i, ids in enumerate(token_lists):
        for w, piece in enumerate(data.windows(ids, max_len)):
            pieces.append(piece)
            where.append((i, w))
    lengths = [len(ids) for ids in pieces]
    per_piece = np.zeros((len(pieces), *shape))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batches = data.length_batches(lengths, batch_size)[rank::world]  # under torchrun: every world-th batch
    bar = progress_bar(len(batches), "scoring", "batch", disable=not progress or rank > 0, leave=False)
    for idx in batches:
        x0, attention_mask = data.collate([pieces[i] for i in idx])
        per_piece[idx] = forward(x0, attention_mask, [lengths[i] for i in idx], [where[i] for i in idx])
        bar.update(1)
    bar.close()
    if world > 1:  # every rank filled only its own rows: the sum gathers them all, on every rank
        gathered = torch.from_numpy(per_piece).to(device)
        dist.all_reduce(gathered)
        per_piece = gathered.cpu().numpy()
    owners = [i for i, _ in where]
    out = np.zeros((len(token_lists), *shape))
    np.add.at(out, owners, per_piece)
    return out, owners


def most_draws(mc_samples: int, max_draws: int | None) -> int:
    """The most draws sequential scoring gives a text: max_draws, or 4 rounds of mc_samples when it is None."""
    return max_draws or 4 * mc_samples


def draws_taken(draws: np.ndarray) -> np.ndarray:
    """How many draws each text got: per-draw NELBOs [N, C, K] (NaN = not taken) -> int [N]."""
    return (~np.isnan(draws[:, 0])).sum(-1)


class ScoringError(ValueError):
    """A NELBO that is not a finite number."""


def score_sequential(models: list, token_lists: list[list[int]], k: int, max_draws: int, z: float, seed: int,
                     batch_size: int, device, class_labels: list | None = None, estimator: str = "time",
                     progress: bool = False, index: np.ndarray | None = None) -> np.ndarray:
    """Sequential Monte-Carlo scoring: per-draw NELBOs in nats, float64 [N, C, max_draws], NaN after
    each text's last draw.

    Draws come in rounds of k: round r is score_draws' stream r (common to every class; the other
    arguments as there). After a round, a text whose paired margin is more than z standard errors
    from 0 (paired_margin: best class against the second) stops; the others get another round, up
    to max_draws. Clear texts thus stop at k draws and close ones get up to max_draws. Every text
    gets round 0, so max_draws = k is fixed-K scoring, and a text stopped after r rounds holds the
    draws that fixed K = r x k in rounds of k would give it. The test is repeated after every
    round without correction, and after a first round of k = 2 draws the standard error has one
    degree of freedom (|margin| > 2 se happens ~30 % of the time for a true tie, not 5 %), so z is
    a stopping threshold whose worth was measured (docs/speed.md), not a guaranteed error rate.
    index: each text's index among all the texts being scored (default 0..N-1): the draws depend on
    it alone, so texts scored in slices, in any order, get the draws they would get scored at once.
    Raises ValueError unless max_draws is a multiple of k and z > 0, and ScoringError for a NaN or
    infinite NELBO (e.g. fp16 overflow), which would otherwise read as a draw not taken.
    """
    if max_draws % k or not z > 0:
        raise ValueError(f"max_draws {max_draws} must be a multiple of k {k}, and z {z} > 0")
    draws = np.full((len(token_lists), len(models), max_draws), np.nan)
    active = np.arange(len(token_lists))
    index = active if index is None else np.asarray(index)
    for r in range(max_draws // k):
        new = score_draws(models, [token_lists[i] for i in active], k, seed, batch_size, device,
                          class_labels, estimator, progress, index=index[active], stream=r)
        if not np.isfinite(new).all():
            bad = int(index[active[np.flatnonzero(~np.isfinite(new).all((1, 2)))[0]]])
            raise ScoringError(f"text {bad + 1}: a NELBO that is NaN or infinite "
                               "(at --precision fp16 it can overflow; try fp32)")
        draws[active, :, r * k:(r + 1) * k] = new
        if k == 1 and r == 0:
            continue  # one draw gives no standard error
        margin, se = paired_margin(draws[active, :, :(r + 1) * k])
        active = active[~(margin > z * se)]
        if not len(active):
            break
    return draws


def score_texts(models: list, token_lists: list[list[int]], k: int, seed: int, batch_size: int, device,
                class_labels: list | None = None, estimator: str = "time", progress: bool = False) -> np.ndarray:
    """The K-draw NELBO estimate of every text under every scorer, in nats: float64 [N, C]
    (the mean over draws of score_draws, which documents the arguments)."""
    return score_draws(models, token_lists, k, seed, batch_size, device, class_labels, estimator, progress).mean(-1)


def paired_margin(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The evidence for each text's decision: (margin, its standard error), float64 [N] each, nats.

    draws: [N, C, K] per-draw NELBOs (score_draws; NaN = a draw not taken, score_sequential).
    margin = NELBO of the second-best class minus that of the best (>= 0); its standard error is the
    sample standard deviation over a text's K_i draws of the per-draw difference, / sqrt(K_i)
    (paired: both classes see the same draws). With stratified draws this overstates the error a
    little (the strata are not independent); NaN for K_i = 1.
    """
    mean = np.nanmean(draws, -1)
    order = np.argsort(mean, axis=1, kind="stable")
    rows = np.arange(len(draws))
    diff = draws[rows, order[:, 1]] - draws[rows, order[:, 0]]  # [N, K]
    k = (~np.isnan(diff)).sum(-1)
    dev = np.where(np.isnan(diff), 0.0, diff - np.nanmean(diff, -1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.sqrt((dev ** 2).sum(-1) / (k - 1) / k)
    return np.nanmean(diff, -1), np.where(k > 1, se, np.nan)
