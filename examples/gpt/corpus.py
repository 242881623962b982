"""A deterministic, English-like training corpus made at start-up, and its character vocabulary.

Nothing is downloaded and no data file is shipped: :func:`make_corpus` expands a small
probabilistic grammar (sentences such as ``"The old fox quietly watches a small river near
the mill."``) with a seeded :class:`random.Random`. The same ``(seed, n_chars)`` always gives
the same text, on every machine and in every process, so all ranks of a job agree on the data
and the vocabulary without talking to each other.

The text has real structure for a model to learn (spelling, word order, agreement of
``a``/``the``, punctuation) but is small: the default 200,000 characters take a few tens of
milliseconds to generate.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

DEFAULT_SEED = 1234
DEFAULT_CHARS = 200_000

_ADJECTIVES = ["old", "small", "quiet", "bright", "green", "cold", "tall", "lazy", "brave",
               "red", "gentle", "hungry", "wise", "young", "dark", "happy"]
_NOUNS = ["fox", "dog", "river", "mill", "king", "child", "bird", "garden", "farmer", "ship",
          "tree", "village", "cat", "teacher", "road", "horse", "moon", "baker"]
_VERBS = ["watches", "finds", "follows", "sees", "loves", "carries", "remembers", "builds",
          "paints", "visits", "hears", "chases", "helps", "keeps"]
_INTRANSITIVE = ["sleeps", "sings", "waits", "runs", "laughs", "rests", "wanders", "dreams"]
_ADVERBS = ["quietly", "slowly", "often", "never", "always", "gladly", "softly", "sometimes"]
_PREPOSITIONS = ["near", "under", "behind", "beside", "across", "above", "inside"]
_TIMES = ["in the morning", "at night", "after the rain", "every day", "before dawn",
          "in winter", "at noon"]


def _noun_phrase(rng: random.Random) -> str:
    """``the|a [adjective] noun``, with ``an`` before a vowel."""
    det = rng.choice(["the", "the", "a"])
    words = [rng.choice(_ADJECTIVES)] if rng.random() < 0.6 else []
    words.append(rng.choice(_NOUNS))
    if det == "a" and words[0][0] in "aeiou":
        det = "an"
    return " ".join([det, *words])


def _sentence(rng: random.Random) -> str:
    """One capitalised sentence ending in ``.`` or ``?`` (statements far more often)."""
    if rng.random() < 0.1:
        if rng.random() < 0.5:
            return f"Where is {_noun_phrase(rng)}?"
        return f"Who {rng.choice(_VERBS)} {_noun_phrase(rng)}?"
    parts = [_noun_phrase(rng)]
    if rng.random() < 0.3:
        parts.append(rng.choice(_ADVERBS))
    if rng.random() < 0.65:
        parts += [rng.choice(_VERBS), _noun_phrase(rng)]
    else:
        parts.append(rng.choice(_INTRANSITIVE))
    if rng.random() < 0.4:
        parts += [rng.choice(_PREPOSITIONS), _noun_phrase(rng)]
    if rng.random() < 0.25:
        parts[-1] += ","
        parts.append(rng.choice(_TIMES))
    text = " ".join(parts)
    return text[0].upper() + text[1:] + "."


def make_corpus(n_chars: int = DEFAULT_CHARS, seed: int = DEFAULT_SEED) -> str:
    """Return exactly ``n_chars`` characters of grammar text; a pure function of its arguments.

    Sentences are separated by a space, with a newline after roughly every sixth sentence.
    """
    if n_chars <= 0:
        raise ValueError(f"n_chars must be positive, got {n_chars}")
    rng = random.Random(seed)
    pieces: list[str] = []
    total = 0
    while total < n_chars:
        piece = _sentence(rng) + ("\n" if rng.random() < 0.16 else " ")
        pieces.append(piece)
        total += len(piece)
    return "".join(pieces)[:n_chars]


@dataclass(frozen=True)
class Vocab:
    """A character vocabulary: ``chars[i]`` is token ``i``; ids are ``0 <= id < size``.

    Built from the sorted set of characters of a text, so it is the same wherever the text is.
    """

    chars: str

    @classmethod
    def of(cls, text: str) -> Vocab:
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as a 1-D ``int64`` tensor of shape ``(len(text),)``; unknown characters raise."""
        index = {c: i for i, c in enumerate(self.chars)}
        try:
            return torch.tensor([index[c] for c in text], dtype=torch.long)
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """The inverse of :meth:`encode` for a 1-D sequence of ids."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self.chars[i] for i in values)
