"""Word embeddings from a corpus: the co-occurrence matrix and its PCA embedding.

The seed's second embedding: a symmetric kernel K measures how often two
words occur near each other; with K = U Λ U^T (eigenvalues in decreasing
order), word w is embedded as its row of the top-d eigenvectors scaled by
the square roots of their eigenvalues,

    e[w] = u_{w, 1..d} ⊙ (λ_1^{1/2}, ..., λ_d^{1/2})

so that e[v] · e[w] is the best rank-d approximation of K[v, w]
(negative eigenvalues, which a count matrix can have, are clipped to 0).

    corpus = [["the", "cat", "sat"], ["the", "dog", "sat"]]
    E, vocab = pca_embedding(corpus, d=2, window=2)
    net.params["E"][...] = E          # initialise a learned embedding(V, d) with it

To keep it fixed instead, declare the table an input (`input E: f32[V, d]`)
and pass E with every call: a non-trained constant.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .forest import Vocab


def cooccurrence(corpus: Iterable[Sequence], vocab: dict | None = None, window: int = 2) -> tuple[np.ndarray, dict]:
    """K[v, w] = how often w occurs within `window` tokens of v (both ways, so K
    is symmetric). `corpus` is a list of token lists (strings or int ids);
    words missing from a given `vocab` are skipped."""
    if window < 1:
        raise ValueError(f"the window must be at least 1, got {window}")
    corpus = [list(s) for s in corpus]
    if vocab is None:
        vocab = Vocab.build(t for s in corpus for t in s)
    K = np.zeros((len(vocab), len(vocab)), np.float64)
    for sent in corpus:
        ids = np.array([vocab[t] for t in sent if t in vocab], np.int64)
        for off in range(1, window + 1):
            if len(ids) > off:
                np.add.at(K, (ids[:-off], ids[off:]), 1.0)
                np.add.at(K, (ids[off:], ids[:-off]), 1.0)
    return K, vocab


def pca_embedding_of(K: np.ndarray, d: int) -> np.ndarray:
    """e[w] = u_{w,1..d} ⊙ λ_{1..d}^{1/2} for a symmetric K; each eigenvector's
    sign is fixed so that its largest component is positive."""
    K = np.asarray(K, np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1] or not np.allclose(K, K.T):
        raise ValueError("the co-occurrence matrix must be square and symmetric")
    if not 1 <= d <= K.shape[0]:
        raise ValueError(f"d must be in [1, {K.shape[0]}], got {d}")
    lam, U = np.linalg.eigh(K)
    top = np.argsort(lam)[::-1][:d]
    lam, U = lam[top], U[:, top]
    U = U * np.where(U[np.argmax(np.abs(U), axis=0), np.arange(d)] < 0, -1.0, 1.0)
    return (U * np.sqrt(np.maximum(lam, 0.0))).astype(np.float32)


def pca_embedding(corpus: Iterable[Sequence], d: int, window: int = 2, vocab: dict | None = None):
    """(E, vocab): the PCA embedding (f32[V, d]) of the corpus's co-occurrence matrix."""
    K, vocab = cooccurrence(corpus, vocab, window)
    return pca_embedding_of(K, d), vocab
