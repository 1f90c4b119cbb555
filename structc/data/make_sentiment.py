"""Generate `sentiment.txt.gz`: a sentiment treebank in the Stanford Sentiment
Treebank's form, made by a documented grammar instead of collected.

    python -m structc.data.make_sentiment        # rewrites structc/data/sentiment.txt.gz

The SST itself is not shipped (its sentences, review snippets from
rottentomatoes.com collected by Pang and Lee, come with no stated licence
that would allow it), so this is a stand-in with the same shape and the same
traps: binary parse trees of short English sentences about films, every
node labelled with the sentiment of its phrase on SST's five-point scale
(0 very negative, 1 negative, 2 neutral, 3 positive, 4 very positive), and
phrases whose sentiment a bag of words cannot tell: negation, intensity and
contrast change what the same words mean.

    (1 (2 (2 the) (2 plot)) (1 (2 was) (1 (2 not) (3 good))))    the plot was not good

**Grammar.** A sentence is a clause, or two clauses joined by `but` or `and`
(the conjunction and the second clause form a phrase of their own, so a tree
is `(S (C1) ((but) (C2)))`). A clause is a noun phrase and a predicate
(`the plot` + `was dull`, `the film` + `was a mess`) or `i` and a
transitive verb phrase (`i` + `loved the cast`). A noun phrase is a
determiner and a noun, the noun possibly with an adjective phrase before
it. An adjective phrase is an adjective, possibly after an intensifier
(`very`, `really`, `extremely`), a softener (`somewhat`, `slightly`) or a
negation (`not`, `never`, which may also come before an intensifier:
`not very good`). Words are drawn uniformly within their kind; the forms
with these odds: a sentence is one clause 50%, `but` 30%, `and` 20%; a
clause is `i` + verb phrase 30%; a noun has an adjective phrase 50%; a
complement is an adjective phrase 75% (else a noun phrase); an adjective
phrase is plain 35%, intensified 20%, softened 10%, negated 20%, negated and
intensified 15%.

**Sentiment.** Every word has a value: strong positive words 2, mild ones 1,
neutral 0, mild negative -1, strong negative -2 (`LEXICON`). A phrase's value
comes from its two parts:

- determiner + noun phrase, a linking verb (`is`, `was`, `seems`, `feels`) + its complement,
  a conjunction + its clause, `i` + verb phrase: the second part's value;
- adjective phrase + noun: the sum;
- intensifier + x: 1.5 x (`extremely`: 2 x); softener + x: x / 2;
- negation + x: -x / 2 (`not good` is mildly negative, `not terrible` mildly
  positive, as SST's annotators rated them);
- subject + predicate: half the subject's value plus the predicate's;
- transitive verb + object: the verb's value plus half the object's;
- clause + (`but` clause): a quarter of the first clause's value plus the
  second's (the contrast wins); clause + (`and` clause): the sum.

A value v has the label 0 below -1.3, 1 up to -0.3, 2 up to 0.3, 3 up to
1.3, and 4 above (no value falls on a threshold: values are multiples of
1/32). Sentences are drawn with a fixed seed, without repeats, until each
of the five root labels has 1,200 training sentences, then 400 held-out
ones: 8,000 sentences, the first 6,000 for training, the last 2,000 held out
(none occurs in training). The task: predict the sentence's label (chance:
20%); every phrase's label is there to learn from, as in SST.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from . import write_lines

SEED = 20261203
N_TRAIN, N_TEST = 6000, 2000

#: word -> value, by category
LEXICON = {
    "det": {"the": 0, "a": 0, "this": 0, "that": 0},
    "noun": {"movie": 0, "film": 0, "plot": 0, "story": 0, "script": 0, "cast": 0, "acting": 0,
             "ending": 0, "music": 0, "dialogue": 0, "director": 0, "sequel": 0,
             "masterpiece": 2, "gem": 2, "treat": 1, "delight": 1, "letdown": -1, "chore": -1,
             "mess": -2, "disaster": -2},
    "adj": {"brilliant": 2, "wonderful": 2, "superb": 2, "great": 2, "good": 1, "nice": 1, "charming": 1,
            "pleasant": 1, "funny": 1, "dull": -1, "bad": -1, "weak": -1, "bland": -1, "silly": -1,
            "terrible": -2, "awful": -2, "dreadful": -2, "horrible": -2,
            "long": 0, "new": 0, "familiar": 0, "quiet": 0, "simple": 0, "french": 0},
    "cop": {"is": 0, "was": 0, "seems": 0, "feels": 0},
    "verb": {"loved": 2, "adored": 2, "enjoyed": 1, "liked": 1, "disliked": -1, "hated": -2,
             "watched": 0, "saw": 0, "remember": 0},
    "int": {"very": Fraction(3, 2), "really": Fraction(3, 2), "extremely": Fraction(2)},
    "soft": {"somewhat": Fraction(1, 2), "slightly": Fraction(1, 2)},
    "neg": {"not": Fraction(-1, 2), "never": Fraction(-1, 2)},
    "conj": {"but": Fraction(1, 4), "and": Fraction(1)},   # the weight of the first clause
}
#: every word, in a fixed order (the vocabulary's ids)
WORDS = [w for kind in LEXICON.values() for w in kind] + ["i"]
#: label thresholds on a phrase's value
THRESHOLDS = (Fraction(-13, 10), Fraction(-3, 10), Fraction(3, 10), Fraction(13, 10))


def label(value: Fraction) -> int:
    """The five-point label of a value."""
    return sum(value > t for t in THRESHOLDS)


class Phrase:
    """A node: its text in treebank form comes from its value's label."""

    def __init__(self, value, words: str, parts=()):
        self.value, self.words, self.parts = Fraction(value), words, parts

    def text(self) -> str:
        inner = " ".join(p.text() for p in self.parts) if self.parts else self.words
        return f"({label(self.value)} {inner})"


def word(kind: str, rng) -> Phrase:
    w = str(rng.choice(list(LEXICON[kind])))
    return Phrase(LEXICON[kind][w] if kind in ("det", "noun", "adj", "cop", "verb") else 0, w)


def join(left: Phrase, right: Phrase, value) -> Phrase:
    return Phrase(value, f"{left.words} {right.words}", (left, right))


def adjective_phrase(rng) -> Phrase:
    adj = word("adj", rng)
    kind = rng.choice(["plain", "int", "soft", "neg", "neg-int"], p=[0.35, 0.2, 0.1, 0.2, 0.15])
    if kind == "plain":
        return adj
    if kind in ("int", "soft"):
        mod = word(kind, rng)
        return join(mod, adj, LEXICON[kind][mod.words] * adj.value)
    inner = adj
    if kind == "neg-int":
        mod = word("int", rng)
        inner = join(mod, adj, LEXICON["int"][mod.words] * adj.value)
    neg = word("neg", rng)
    return join(neg, inner, LEXICON["neg"][neg.words] * inner.value)


def noun_phrase(rng) -> Phrase:
    noun = word("noun", rng)
    if rng.random() < 0.5:
        adjp = adjective_phrase(rng)
        noun = join(adjp, noun, adjp.value + noun.value)
    det = word("det", rng)
    return join(det, noun, noun.value)


def clause(rng) -> Phrase:
    if rng.random() < 0.3:     # i + verb + object
        verb, obj = word("verb", rng), noun_phrase(rng)
        vp = join(verb, obj, verb.value + obj.value / 2)
        return join(Phrase(0, "i"), vp, vp.value)
    subject = noun_phrase(rng)
    cop = word("cop", rng)
    complement = adjective_phrase(rng) if rng.random() < 0.75 else noun_phrase(rng)
    predicate = join(cop, complement, complement.value)
    return join(subject, predicate, subject.value / 2 + predicate.value)


def sentence(rng) -> Phrase:
    first = clause(rng)
    joined = rng.choice(["none", "but", "and"], p=[0.5, 0.3, 0.2])
    if joined == "none":
        return first
    conj, second = word("conj", rng), clause(rng)
    tail = join(conj, second, second.value)
    return join(first, tail, LEXICON["conj"][conj.words] * first.value + second.value)


def draw(rng, per_label: int, seen: set) -> list[str]:
    """Sentences until each root label has `per_label`, none in `seen` (which gets them)."""
    lines: list[str] = []
    want = [per_label] * 5
    while any(want):
        s = sentence(rng)
        root = label(s.value)
        if want[root] and s.words not in seen:
            seen.add(s.words)
            lines.append(s.text())
            want[root] -= 1
    return lines


def generate() -> list[str]:
    """The training sentences, then the held-out ones: each set a fifth of each label."""
    rng = np.random.default_rng(SEED)
    seen: set[str] = set()
    return draw(rng, N_TRAIN // 5, seen) + draw(rng, N_TEST // 5, seen)


def main() -> None:
    path = write_lines("sentiment", generate())
    print(f"wrote {path} ({N_TRAIN} training + {N_TEST} held-out sentences)")


if __name__ == "__main__":
    main()
