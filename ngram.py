"""Counts language models: the yardsticks every MDLM loss is read against.

A model that predicts a masked token no better than the unigram frequencies has learned no
language; one below the bigram model uses its neighbours. Both are fitted on training texts and
scored on the same texts as the MDLM, in nats per token (GPT-2 BPE ids, data.encode).

- Unigram, add-1/2 smoothing over the V = 50257 real tokens: p(w) = (c(w) + 1/2) / (N + V/2).
- Bigram, left to right, absolute discounting (Ney, Essen & Kneser 1994) with D = 0.75 and the
  unigram above as the back-off: p(w | v) = max(c(v, w) - D, 0) / c(v) + D * n(v) / c(v) * p(w),
  n(v) the number of distinct successors of v; a v never seen as a predecessor backs off to p(w).
  A text's first token has no predecessor and is scored by the unigram.

    lm = CountsLM.fit(train_tokens)
    lm.unigram_nll(test_tokens), lm.bigram_nll(test_tokens)   # nats per token
"""
import numpy as np

N_REAL = 50257   # GPT-2's tokens; the mask token never occurs in a text
ADD = 0.5        # unigram smoothing
DISCOUNT = 0.75  # absolute discount of the bigram


class CountsLM:
    """Unigram and bigram counts of token id lists (each a text, ids in 0..N_REAL-1)."""

    def __init__(self, unigram: np.ndarray, pairs: np.ndarray, pair_counts: np.ndarray, n_real: int = N_REAL):
        self.n_real = n_real
        self.p_uni = (unigram + ADD) / (unigram.sum() + ADD * n_real)          # float64 [V]
        self.pairs, self.pair_counts = pairs, pair_counts                       # sorted v * V + w, and c(v, w)
        first = pairs // n_real
        self.context = np.bincount(first, weights=pair_counts, minlength=n_real)  # c(v) as a predecessor
        self.successors = np.bincount(first, minlength=n_real)                 # n(v)

    @classmethod
    def fit(cls, tokens: list[list[int]], n_real: int = N_REAL) -> "CountsLM":
        """Counts from `tokens` (lists of ids). Raises ValueError for an id outside 0..n_real-1."""
        flat = np.concatenate([np.asarray(t, dtype=np.int64) for t in tokens])
        if len(flat) and (flat.min() < 0 or flat.max() >= n_real):
            raise ValueError(f"token ids must be in 0..{n_real - 1}, got {flat.min()}..{flat.max()}")
        keys = np.concatenate([np.asarray(t[:-1], dtype=np.int64) * n_real + np.asarray(t[1:], dtype=np.int64)
                               for t in tokens if len(t) > 1] or [np.zeros(0, np.int64)])
        pairs, pair_counts = np.unique(keys, return_counts=True)
        return cls(np.bincount(flat, minlength=n_real).astype(np.float64), pairs, pair_counts.astype(np.float64), n_real)

    def unigram_nll(self, tokens: list[list[int]]) -> float:
        """Cross-entropy of `tokens` under the unigram, nats per token (float)."""
        flat = np.concatenate([np.asarray(t, dtype=np.int64) for t in tokens])
        return float(-np.log(self.p_uni[flat]).mean())

    def bigram_probs(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """p(nxt | prev) elementwise: int64 arrays of equal shape -> float64."""
        keys = prev * self.n_real + nxt
        at = np.searchsorted(self.pairs, keys).clip(max=max(len(self.pairs) - 1, 0))
        count = np.where((len(self.pairs) > 0) & (self.pairs[at] == keys), self.pair_counts[at], 0.0) \
            if len(self.pairs) else np.zeros(len(keys))
        c_v = self.context[prev]
        seen = c_v > 0
        safe = np.where(seen, c_v, 1.0)
        p = np.maximum(count - DISCOUNT, 0) / safe + DISCOUNT * self.successors[prev] / safe * self.p_uni[nxt]
        return np.where(seen, p, self.p_uni[nxt])

    def bigram_nll(self, tokens: list[list[int]]) -> float:
        """Cross-entropy of `tokens` under the bigram (first token of each text: the unigram), nats per token."""
        prev = np.concatenate([np.asarray(t[:-1], dtype=np.int64) for t in tokens])
        nxt = np.concatenate([np.asarray(t[1:], dtype=np.int64) for t in tokens])
        firsts = np.asarray([t[0] for t in tokens], dtype=np.int64)
        total = -np.log(self.bigram_probs(prev, nxt)).sum() - np.log(self.p_uni[firsts]).sum()
        return float(total / (len(nxt) + len(firsts)))
