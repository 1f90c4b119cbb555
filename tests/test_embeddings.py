"""pca_embedding: the co-occurrence counts and their best rank-d approximation, one value back,
rows in the order of the vocabulary the caller passes."""
import numpy as np
import pytest

from structc.embeddings import cooccurrence, pca_embedding
from structc.forest import Vocab

CORPUS = [["the", "cat", "sat"], ["the", "dog", "sat"], ["a", "cat", "ran"], ["the", "dog", "ran"]] * 3


def test_rows_follow_the_given_vocabulary():
    first_seen = Vocab.build(t for s in CORPUS for t in s)
    alphabetical = {w: i for i, w in enumerate(sorted(first_seen))}
    assert list(alphabetical) != list(first_seen)          # else the test could not tell them apart
    E_seen = pca_embedding(CORPUS, first_seen, d=3)
    E_alpha = pca_embedding(CORPUS, alphabetical, d=3)
    assert isinstance(E_alpha, np.ndarray) and E_alpha.shape == (len(first_seen), 3)
    for w in first_seen:
        np.testing.assert_allclose(E_alpha[alphabetical[w]], E_seen[first_seen[w]], atol=1e-5)


def test_a_list_of_words_is_a_vocabulary():
    words = ["sat", "ran", "the", "a", "cat", "dog"]
    E_list = pca_embedding(CORPUS, words, d=2)
    E_dict = pca_embedding(CORPUS, {w: i for i, w in enumerate(words)}, d=2)
    np.testing.assert_array_equal(E_list, E_dict)


def test_the_vocabulary_is_required():
    with pytest.raises(TypeError, match="pass the vocabulary"):
        pca_embedding(CORPUS, 3, 2)                         # the old pca_embedding(corpus, d, window) call
    with pytest.raises(TypeError, match="vocab"):
        pca_embedding(CORPUS, d=3)
    with pytest.raises(TypeError, match="pass the vocabulary"):
        pca_embedding(CORPUS, None, d=3)


@pytest.mark.parametrize("vocab, message", [
    ({"the": 0, "cat": 1, "dog": 2, "sat": 3, "a": 4, "ran": 9}, "ids must be 0..5"),
    ({"the": 0, "cat": 1, "dog": 1, "sat": 3, "a": 4, "ran": 5}, "id 1 to several words"),
    ({"the": 0, "cat": 1, "dog": 2, "sat": 3, "a": 4, "ran": -1}, "ids must be 0..5"),
    (["the", "cat", "dog", "sat", "a", "the"], "lists 'the' twice"),
])
def test_a_vocabulary_that_misplaces_rows_is_refused(vocab, message):
    with pytest.raises(ValueError, match=message):
        pca_embedding(CORPUS, vocab, d=2)


def test_ids_must_be_integers():
    with pytest.raises(TypeError, match="must be integers"):
        pca_embedding(CORPUS, {w: float(i) for i, w in enumerate(["the", "cat", "dog", "sat", "a", "ran"])}, d=2)
    with pytest.raises(TypeError, match="dict word -> id or a list"):
        pca_embedding(CORPUS, "thecat", d=2)


def test_corpus_words_missing_from_the_vocabulary():
    small = ["the", "cat", "sat"]
    with pytest.raises(ValueError, match=r"3 word\(s\) of the corpus are not in the vocabulary \('a', 'dog', 'ran'\)"):
        pca_embedding(CORPUS, small, d=2)
    E = pca_embedding(CORPUS, small, d=2, skip_unknown=True)
    K, _ = cooccurrence([["the", "cat", "sat"]] * 3, small)   # what is left of the corpus
    assert E.shape == (3, 2) and np.isfinite(E).all() and K[0, 1] == 3


def test_window_and_d_are_checked():
    with pytest.raises(ValueError, match="window"):
        pca_embedding(CORPUS, Vocab.build(t for s in CORPUS for t in s), d=2, window=0)
    with pytest.raises(ValueError, match=r"d must be in \[1, 6\]"):
        pca_embedding(CORPUS, Vocab.build(t for s in CORPUS for t in s), d=7)


@pytest.mark.parametrize("corpus, message", [
    ("the cat sat", "one string"),
    (["the cat sat", "the dog ran"], "sentence 0 of the corpus is a string"),
])
def test_a_corpus_of_strings_is_refused(corpus, message):
    # iterated, each sentence's letters were its tokens: {'t': 0, 'h': 1, 'e': 2, ' ': 3, ...}
    with pytest.raises(TypeError, match=message):
        cooccurrence(corpus)


def test_cooccurrence_counts_every_pair_both_ways():
    """a b a b, window 1: a next to b three times; window 2 adds a two apart from a (and
    b from b), once from each side. A pair met twice in one sentence counts twice
    (numpy's K[i, j] += 1 with repeated (i, j) would count it once)."""
    K, vocab = cooccurrence([["a", "b", "a", "b"]], window=1)
    assert vocab == {"a": 0, "b": 1} and K.tolist() == [[0, 3], [3, 0]]
    K, _ = cooccurrence([["a", "b", "a", "b"]], window=2)
    assert K.tolist() == [[2, 3], [3, 2]]


def test_pca_embedding_is_the_best_rank_d_approximation():
    """E E^T is K's rank-d approximation from its d largest eigenvalues, and each column's
    largest component is positive."""
    K, vocab = cooccurrence(CORPUS)
    lam, U = np.linalg.eigh(K)                      # 13.06, 3.83, then 0 and three negative ones
    order = np.argsort(lam)[::-1]
    top = order[:2]
    assert lam[order[1]] > lam[order[2]] + 1        # a gap: the rank-2 approximation is one answer
    E = pca_embedding(CORPUS, vocab, d=2)
    np.testing.assert_allclose(E @ E.T, (U[:, top] * lam[top]) @ U[:, top].T, atol=1e-4)
    assert (E[np.argmax(np.abs(E), axis=0), [0, 1]] > 0).all()
