"""The shipped sentiment treebank (`--data sentiment`): made as
structc/data/make_sentiment.py documents it, byte for byte, every phrase's label
by the documented rules (recomputed here from the trees alone), balanced and
with no held-out sentence in training."""
import hashlib
import re
from fractions import Fraction

import numpy as np
import pytest

from structc.data import gz_lines, make_sentiment as ms
from structc.treedata import SENTIMENT_SHA256, _shipped_lines, load_sentiment

#: the rules of the module's docstring, written out again: word kinds by word
KIND = {w: kind for kind, words in ms.LEXICON.items() for w in words}
WEIGHT = {"very": Fraction(3, 2), "really": Fraction(3, 2), "extremely": Fraction(2),
          "somewhat": Fraction(1, 2), "slightly": Fraction(1, 2), "not": Fraction(-1, 2), "never": Fraction(-1, 2)}
FIRST_CLAUSE = {"but": Fraction(1, 4), "and": Fraction(1)}
THRESHOLDS = (-1.3, -0.3, 0.3, 1.3)


def parse(text: str):
    """(label, word) for a leaf, (label, left, right) for a binary node."""
    tokens = re.findall(r"\(|\)|[^\s()]+", text)
    at = 0

    def node():
        nonlocal at
        assert tokens[at] == "("
        lab = int(tokens[at + 1])
        at += 2
        if tokens[at] != "(":
            leaf = (lab, tokens[at])
            at += 2
            return leaf
        left, right = node(), node()
        assert tokens[at] == ")"
        at += 1
        return (lab, left, right)
    tree = node()
    assert at == len(tokens)
    return tree


def word_of(tree):
    return tree[1] if len(tree) == 2 else None


def value(tree) -> Fraction:
    """A phrase's value by the documented rules, from its two parts."""
    if len(tree) == 2:
        w = tree[1]
        return Fraction(ms.LEXICON[KIND[w]][w]) if KIND.get(w) in ("det", "noun", "adj", "cop", "verb") else Fraction(0)
    _, left, right = tree
    first = word_of(left)
    if first in WEIGHT:                                  # intensifier, softener, negation + x
        return WEIGHT[first] * value(right)
    if first == "i" or KIND.get(first) in ("det", "cop", "conj"):
        return value(right)
    if KIND.get(first) == "verb":                        # transitive verb + object
        return value(left) + value(right) / 2
    if KIND.get(word_of(right)) == "noun":               # adjective phrase + noun
        return value(left) + value(right)
    if len(right) == 3 and word_of(right[1]) in FIRST_CLAUSE:   # clause + (but|and clause)
        return FIRST_CLAUSE[word_of(right[1])] * value(left) + value(right)
    return value(left) / 2 + value(right)                # subject + predicate


def labels_agree(tree) -> bool:
    expected = sum(float(value(tree)) > t for t in THRESHOLDS)
    return tree[0] == expected and (len(tree) == 2 or (labels_agree(tree[1]) and labels_agree(tree[2])))


@pytest.fixture(scope="module")
def lines():
    return _shipped_lines("sentiment", SENTIMENT_SHA256)


def test_every_phrase_is_labelled_by_the_documented_rules(lines):
    assert len(lines) == 8000
    wrong = [line for line in lines if not labels_agree(parse(line))]
    assert not wrong, wrong[:3]


@pytest.mark.parametrize("text, expected", [
    ("(3 good)", 3), ("(4 (2 very) (3 good))", 4), ("(3 (2 somewhat) (4 great))", 3),
    ("(1 (2 not) (3 good))", 1), ("(3 (2 not) (0 terrible))", 3), ("(1 (2 not) (4 (2 very) (3 good)))", 1),
    # the contrast wins: the plot was dull but the cast was great
    ("(4 (1 (2 (2 the) (2 plot)) (1 (2 was) (1 dull))) (4 (2 but) (4 (2 (2 the) (2 cast)) (4 (2 was) (4 great)))))",
     4),
])
def test_the_rules_on_phrases(text, expected):
    tree = parse(text)
    assert labels_agree(tree) and tree[0] == expected


def test_the_same_words_in_another_order_mean_another_thing():
    """Why a bag of words cannot do it (examples/sentiment_bow.snet): "the dull plot
    was good" is positive, "the good plot was dull" negative."""
    one = parse("(3 (1 (2 the) (1 (1 dull) (2 plot))) (3 (2 was) (3 good)))")
    other = parse("(1 (3 (2 the) (3 (3 good) (2 plot))) (1 (2 was) (1 dull)))")
    assert labels_agree(one) and labels_agree(other)
    assert (one[0], other[0]) == (3, 1)


def test_data_set_is_balanced_and_disjoint():
    d = load_sentiment()
    assert len(d.train) == 6000 and len(d.test) == 2000 and len(d.vocab) == len(ms.WORDS) == 71
    for part, per_label in ((d.train, 1200), (d.test, 400)):
        roots = np.array([int(f.root_labels[0]) for f in part])
        assert np.bincount(roots, minlength=5).tolist() == [per_label] * 5
    assert max(f.arity for f in d.train + d.test) == 2
    key = lambda f: f.words.tobytes()    # noqa: E731  (a sentence: its words in order)
    assert not {key(f) for f in d.train} & {key(f) for f in d.test}


@pytest.mark.slow
def test_generator_makes_the_shipped_file():
    assert hashlib.sha256(gz_lines(ms.generate())).hexdigest() == SENTIMENT_SHA256


def test_a_data_set_bound_again_feeds_only_the_new_models_targets():
    """Bound to the Tree-LSTM (a root and a node target), then to the bag of words
    (a root target only): its feeds and held-out evaluation are the second model's
    (the node target was kept from the first bind: `... has no input 's'`)."""
    import structc
    from pathlib import Path
    examples = Path(__file__).parent.parent / "examples"
    d = load_sentiment()
    d.bind(structc.compile(examples / "sentiment_treelstm.snet", training=True))
    assert set(d.feed(d.test[0])) == {"t", "y", "s"}
    bow = structc.compile(examples / "sentiment_bow.snet", training=True)
    d.bind(bow)
    assert set(d.feed(d.test[0])) == {"t", "y"}
    assert 0.0 <= d.evaluate(bow)["accuracy"] <= 1.0
