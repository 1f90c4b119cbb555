"""Word embeddings from a corpus: the co-occurrence matrix and its PCA embedding.

The seed's second embedding: a symmetric kernel K measures how often two
words occur near each other; with K = U Λ U^T (eigenvalues in decreasing
order), word w is embedded as its row of the top-d eigenvectors scaled by
the square roots of their eigenvalues,

    e[w] = u_{w, 1..d} ⊙ (λ_1^{1/2}, ..., λ_d^{1/2})

so that e[v] · e[w] is the best rank-d approximation of K[v, w]
(negative eigenvalues, which a count matrix can have, are clipped to 0).

    corpus = [["the", "cat", "sat"], ["the", "dog", "sat"]]
    vocab = {"the": 0, "cat": 1, "dog": 2, "sat": 3}   # the ids your model's inputs use
    E = pca_embedding(corpus, vocab, d=2, window=2)   # row vocab[w] embeds word w
    net.params["E"][...] = E          # initialise a learned embedding(V, d) with it

The vocabulary is always the caller's (a dict word -> id, or a list of words
whose positions are their ids; `structc.forest.Vocab.build(tokens)` makes one
in order of first appearance), so the rows can never be in an order the
model does not expect.

To keep it fixed instead, declare the table an input (`input E: f32[V, d]`)
and pass E with every call: a non-trained constant.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .forest import Vocab


def cooccurrence(corpus: Iterable[Sequence], vocab: Mapping | Sequence | None = None, window: int = 2,
                 skip_unknown: bool = False) -> tuple[np.ndarray, dict]:
    """(K, vocab): K[v, w] = how often w occurs within `window` tokens of v
    (both ways, so K is symmetric). `corpus` is a list of token lists (strings
    or int ids). Without a `vocab`, one is built in order of first appearance;
    a given one is checked (`as_vocab`), and a corpus word missing from it is
    an error unless `skip_unknown`."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"the window must be an integer of at least 1, got {window!r}")
    if isinstance(corpus, (str, bytes)):
        raise TypeError("the corpus is a list of sentences, each a list of tokens; got one string "
                        "(split it: [line.split() for line in text.splitlines()])")
    corpus = [_tokens(s, k) for k, s in enumerate(corpus)]
    if vocab is None:
        vocab = Vocab.build(t for s in corpus for t in s)
    else:
        vocab = as_vocab(vocab)
        if not skip_unknown:
            check_corpus_words(corpus, vocab)
    K = np.zeros((len(vocab), len(vocab)), np.float64)
    for sent in corpus:
        ids = np.array([vocab[t] for t in sent if t in vocab], np.int64)
        for off in range(1, window + 1):
            if len(ids) > off:
                np.add.at(K, (ids[:-off], ids[off:]), 1.0)
                np.add.at(K, (ids[off:], ids[:-off]), 1.0)
    return K, vocab


def _tokens(sentence, k: int) -> list:
    """Sentence `k`'s tokens; a string is refused (its letters would be the tokens)."""
    if isinstance(sentence, (str, bytes)):
        raise TypeError(f"sentence {k} of the corpus is a string ({sentence[:40]!r}), not a list of tokens; "
                        "split it: [line.split() for line in lines]")
    return list(sentence)


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


def pca_embedding(corpus: Iterable[Sequence], vocab: Mapping | Sequence, d: int, window: int = 2,
                  skip_unknown: bool = False) -> np.ndarray:
    """E (f32[len(vocab), d]): the PCA embedding of the corpus's co-occurrence
    matrix, row vocab[w] for word w. `vocab` is a dict word -> id (ids exactly
    0..V-1) or a list of words (word i gets row i). A corpus word missing
    from `vocab` is a ValueError unless `skip_unknown` (then it is ignored)."""
    if vocab is None or isinstance(vocab, (int, np.integer)):
        raise TypeError("pca_embedding(corpus, vocab, d, window=2): pass the vocabulary whose ids the rows "
                        "follow (a dict word -> id or a list of words; structc.forest.Vocab.build(tokens) "
                        f"builds one in order of first appearance), got {vocab!r}")
    K, _ = cooccurrence(corpus, vocab, window, skip_unknown)
    return pca_embedding_of(K, d)


def as_vocab(vocab: Mapping | Sequence) -> dict:
    """A word -> id dict whose ids are exactly 0..V-1, from a dict or a list of
    words; gaps, duplicates and ids out of range raise ValueError (they would
    put rows where the model does not look for them)."""
    if isinstance(vocab, Mapping):
        words = dict(vocab)
    elif isinstance(vocab, Sequence) and not isinstance(vocab, (str, bytes)):
        words = {}
        for i, w in enumerate(vocab):
            if w in words:
                raise ValueError(f"the vocabulary lists {w!r} twice (positions {words[w]} and {i})")
            words[w] = i
    else:
        raise TypeError(f"the vocabulary must be a dict word -> id or a list of words, got {type(vocab).__name__}")
    ids = list(words.values())
    for w, i in words.items():
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"the vocabulary's ids must be integers; {w!r} has {i!r}")
        if not 0 <= i < len(words):
            raise ValueError(f"the vocabulary's ids must be 0..{len(words) - 1} (one row per word); "
                             f"{w!r} has id {i}")
    if len(set(ids)) != len(ids):
        shared = sorted({i for i in ids if ids.count(i) > 1})[0]
        names = [w for w, i in words.items() if i == shared]
        raise ValueError(f"the vocabulary gives id {shared} to several words ({', '.join(map(repr, names))})")
    return {w: int(i) for w, i in words.items()}


def check_corpus_words(corpus: list[list], vocab: dict) -> None:
    """Refuse a corpus with words the vocabulary lacks: their co-occurrences
    would vanish without a trace."""
    missing = sorted({t for s in corpus for t in s if t not in vocab}, key=str)
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise ValueError(f"{len(missing)} word(s) of the corpus are not in the vocabulary ({shown}); "
                         "add them, or pass skip_unknown=True to ignore them")
