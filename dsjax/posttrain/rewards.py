"""GRPO's reward: terms in [0, 1] computed on the host from a completion's text.

    reward = coverage_weight * coverage + ending_weight * ending + length_weight * length
             - repetition_weight * repetition          (weights: the config's `grpo` block)

- coverage: the fraction of the prompt's required words the completion contains, as
  whole words, case-insensitively, with regular inflections allowed: plural -s/-es,
  -ed/-d, -ing, -er/-est, with the usual e-dropping (smile -> smiling), y -> i
  (cry -> cried) and final-consonant doubling (hop -> hopped). Irregular forms (run ->
  ran) do not count; inflecting is generous rather than exact (park also matches
  parked), which only ever accepts a form of the word itself. No required words: 1.
- ending: 1 when the completion ended with a stop token (<|end|> or </s>) right after
  sentence-final punctuation (. ! ?, optionally followed by closing quotes or a
  bracket, then whitespace); 0 when it was cut by the length limit or stopped mid-sentence.
- length: words = whitespace-separated pieces. 1 inside [min_words, max_words];
  below, n / min_words; above, 1 - (n - max_words) / max_words, floored at 0: a smooth
  ramp, so a group whose samples are all too short still ranks the longer ones higher.
- repetition: 1 - (distinct word 3-grams / word 3-grams), in [0, 1]; 0 below three words.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

TERMS = ("coverage", "ending", "length", "repetition")
_VOWELS = set("aeiou")
_CLEAN_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s*$")
_WORD = re.compile(r"[a-z0-9']+")


def words_of(text: str) -> list[str]:
    """Lowercase words (letters, digits, apostrophes) in order."""
    return _WORD.findall(text.lower())


def inflections(word: str) -> set[str]:
    """The word and its regular inflected forms (see the module docstring)."""
    w = word.lower()
    forms = {w}
    if not w.isalpha():
        return forms
    forms |= {w + "s", w + "ed", w + "ing", w + "er", w + "est"}
    if w.endswith("e"):
        forms |= {w + "d", w[:-1] + "ing", w + "r", w + "st"}
    if w.endswith(("s", "x", "z", "ch", "sh", "o")):
        forms.add(w + "es")
    if len(w) > 1 and w.endswith("y") and w[-2] not in _VOWELS:
        forms |= {w[:-1] + suffix for suffix in ("ies", "ied", "ier", "iest")}
    if len(w) >= 3 and w[-1] not in _VOWELS | set("wxy") and w[-2] in _VOWELS and w[-3] not in _VOWELS:
        forms |= {w + w[-1] + suffix for suffix in ("ed", "ing", "er", "est")}
    return forms


@functools.lru_cache(maxsize=4096)
def _pattern(word: str) -> re.Pattern:
    alternatives = "|".join(sorted((re.escape(f) for f in inflections(word)), key=len, reverse=True))
    return re.compile(rf"(?<![a-z0-9])(?:{alternatives})(?![a-z0-9])", re.IGNORECASE)


def contains_word(text: str, word: str) -> bool:
    """Whether `text` holds `word` (or a regular inflection of it) as a whole word, ignoring case."""
    return _pattern(word.strip().lower()).search(text) is not None


def coverage(text: str, words: tuple[str, ...] | list[str]) -> float:
    if not words:
        return 1.0
    return sum(contains_word(text, w) for w in words) / len(words)


def clean_ending(text: str, stopped: bool) -> float:
    return 1.0 if stopped and _CLEAN_END.search(text) else 0.0


def length_score(text: str, min_words: int, max_words: int) -> float:
    n = len(text.split())
    if n < min_words:
        return n / min_words
    if n > max_words:
        return max(0.0, 1.0 - (n - max_words) / max_words)
    return 1.0


def repetition(text: str) -> float:
    words = words_of(text)
    grams = list(zip(words, words[1:], words[2:]))
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@dataclass(frozen=True)
class RewardSpec:
    """The weights and the length window: the reward-shaping part of the config's `grpo` block."""

    coverage_weight: float = 1.0
    ending_weight: float = 0.5
    length_weight: float = 0.5
    repetition_weight: float = 0.5
    min_words: int = 40
    max_words: int = 180

    @classmethod
    def from_config(cls, g) -> "RewardSpec":
        return cls(
            g.coverage_weight, g.ending_weight, g.length_weight, g.repetition_weight, g.min_words, g.max_words
        )


def reward_terms(text: str, stopped: bool, words, spec: RewardSpec) -> dict[str, float]:
    """Each term and the weighted total ("reward") for one completion."""
    terms = {
        "coverage": coverage(text, words),
        "ending": clean_ending(text, stopped),
        "length": length_score(text, spec.min_words, spec.max_words),
        "repetition": repetition(text),
    }
    terms["reward"] = (
        spec.coverage_weight * terms["coverage"]
        + spec.ending_weight * terms["ending"]
        + spec.length_weight * terms["length"]
        - spec.repetition_weight * terms["repetition"]
    )
    return terms
