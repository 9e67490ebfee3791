"""Instruction data: (prompt, response) pairs made from TinyStories itself, or read from TinyStoriesInstruct files.

From stories (`instructions_from_stories`): each story becomes

    prompt   "Write a story that uses the words: ball, jump, red. The story has dialogue."
    response the story

- The words are a noun, a verb and an adjective drawn from small fixed lists (NOUNS,
  VERBS, ADJECTIVES below: concrete, common TinyStories words; the commonest ones such
  as happy, big, little are left out because nearly every story has them). A word is a
  candidate when the story contains it by `rewards.contains_word`, the same matcher the
  GRPO reward uses: whole words, case-insensitive, regular inflections allowed (jump
  matches jumped; irregular forms never count). Verbs are therefore regular verbs.
  One word per category is drawn among the candidates; a story with no candidate in a
  category asks for fewer words, and one with none at all gets "Write a story.".
- With features, one feature the story has is added, drawn among: dialogue (the story
  holds a quotation mark), a happy or a sad ending (the last two sentences scored by a
  small lexicon, HAPPY_WORDS minus SAD_WORDS: positive = happy, negative = sad, tie =
  no ending feature).
- Every draw is seeded by (seed, the story's text), so a story gets the same prompt in
  any file and order.

From a TinyStoriesInstruct file (`instructions_from_instruct_file`): plain-text records
separated by lines holding `<|endoftext|>`, each with fields in any order:

    Features: Dialogue, BadEnding      (optional)
    Words: quit, oak, gloomy           (optional)
    Random sentence: ...               (optional)
    Summary: ...                       (optional)
    Story:
    <story paragraphs, up to the next field line or the end of the record>

turned into the same prompt format: the words sentence, one sentence per feature, then
the random sentence and the summary when present. Records without a story are skipped.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsjax.data.download import END_OF_TEXT, SplitStats, iter_run_stories
from dsjax.posttrain.rewards import contains_word, words_of

NOUNS = (
    "dog", "cat", "bird", "ball", "tree", "park", "house", "garden", "toy", "box", "car", "sun", "sky", "water",
    "flower", "fish", "bear", "forest", "door", "bed", "book", "boat", "cake", "apple", "hat", "rock", "kite",
    "mouse", "duck", "rabbit", "frog", "truck", "train", "doll", "river", "hill", "star", "moon", "cookie", "shoe",
    "bike", "bag", "picture", "window", "table", "sand", "snow", "rain", "leaf", "puppy", "bunny", "lion", "cow",
    "horse", "pond", "beach", "castle", "ice", "juice", "milk", "candy", "balloon", "drum", "bug", "butterfly",
)
VERBS = (
    "play", "jump", "walk", "look", "smile", "laugh", "help", "climb", "dance", "cook", "paint", "share", "open",
    "clean", "pick", "push", "pull", "hug", "wave", "kick", "splash", "bake", "fix", "watch", "listen", "hop",
    "ask", "talk", "visit", "explore", "plant", "wash", "kiss", "hide", "search", "float", "shout", "roll",
    "chase", "count", "cry", "dream", "learn", "wish", "bounce", "skip", "clap", "touch", "paddle", "spill",
)
ADJECTIVES = (
    "red", "blue", "green", "yellow", "pink", "white", "shiny", "soft", "warm", "cold", "dark", "bright", "tall",
    "brave", "kind", "funny", "pretty", "beautiful", "sad", "scared", "angry", "curious", "tired", "hungry",
    "loud", "quiet", "tiny", "fast", "strong", "colorful", "yummy", "sweet", "silly", "proud", "excited",
    "careful", "friendly", "gentle", "wet", "clean", "old", "new", "special", "smart", "fluffy", "sleepy",
)
HAPPY_WORDS = frozenset(
    "happy happily smiled smile smiles smiling laughed laugh laughing fun love loved glad joy hugged hug "
    "proud safe thanked cheered friends together best great".split()
)
SAD_WORDS = frozenset(
    "sad sadly cried cry crying tears hurt sorry lost broke broken alone lonely died scared angry gone "
    "missed bad upset".split()
)

DIALOGUE, HAPPY_ENDING, SAD_ENDING = "dialogue", "happy ending", "sad ending"
FEATURE_SENTENCES = {
    DIALOGUE: "The story has dialogue.",
    HAPPY_ENDING: "The story has a happy ending.",
    SAD_ENDING: "The story has a sad ending.",
    "moral": "The story has a moral.",
    "twist": "The story has a plot twist.",
    "foreshadowing": "The story uses foreshadowing.",
    "conflict": "The story has a conflict.",
}
# TinyStoriesInstruct's feature names -> ours
INSTRUCT_FEATURES = {
    "dialogue": DIALOGUE, "badending": SAD_ENDING, "moralvalue": "moral", "twist": "twist",
    "foreshadowing": "foreshadowing", "conflict": "conflict",
}
FIELDS = ("Features", "Words", "Random sentence", "Summary", "Story")
_FIELD_LINE = re.compile(r"^(Features|Words|Random sentence|Summary|Story):[ \t]*(.*)$")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019]*\s+")


@dataclass(frozen=True)
class Instruction:
    prompt: str
    response: str
    words: tuple[str, ...]  # the words the prompt asks for (the coverage reward's targets)
    features: tuple[str, ...]  # keys of FEATURE_SENTENCES the prompt asks for


def make_prompt(words: tuple[str, ...], features: tuple[str, ...], extra: tuple[str, ...] = ()) -> str:
    """The prompt text: the words sentence, one sentence per feature, then any extra sentences."""
    parts = [f"Write a story that uses the words: {', '.join(words)}." if words else "Write a story."]
    for feature in features:
        parts.append(FEATURE_SENTENCES.get(feature) or f"The story has {feature}.")
    parts.extend(extra)
    return " ".join(parts)


def story_features(story: str) -> tuple[str, ...]:
    """The features a story really has: dialogue, and a happy or a sad ending by the lexicon."""
    found = []
    if '"' in story or "\u201c" in story:
        found.append(DIALOGUE)
    sentences = [s for s in _SENTENCE_END.split(story.strip()) if s.strip()]
    ending = words_of(" ".join(sentences[-2:]))
    score = sum(w in HAPPY_WORDS for w in ending) - sum(w in SAD_WORDS for w in ending)
    if score > 0:
        found.append(HAPPY_ENDING)
    elif score < 0:
        found.append(SAD_ENDING)
    return tuple(found)


def _rng(seed: int, story: str) -> random.Random:
    return random.Random(hashlib.sha256(f"{seed}\0{story}".encode()).digest())


def instruction_for_story(story: str, with_features: bool = True, seed: int = 0) -> Instruction:
    rng = _rng(seed, story)
    words = []
    for vocabulary in (NOUNS, VERBS, ADJECTIVES):
        candidates = [w for w in vocabulary if contains_word(story, w)]
        if candidates:
            words.append(rng.choice(candidates))
    features: tuple[str, ...] = ()
    if with_features:
        available = story_features(story)
        if available:
            features = (rng.choice(available),)
    return Instruction(make_prompt(tuple(words), features), story.strip(), tuple(words), features)


def instructions_from_stories(jsonl_path: Path, with_features: bool = True, seed: int = 0) -> list[Instruction]:
    """One instruction per non-empty story of a `{"text": ...}` JSONL file, in file order."""
    stats = SplitStats()
    return [instruction_for_story(s, with_features, seed) for s in iter_run_stories(Path(jsonl_path), stats)]


def _split_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _instruct_records(text: str):
    """Field dicts of a TinyStoriesInstruct text: records split at <|endoftext|> (or a repeated field after a story)."""
    record: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.strip() == END_OF_TEXT or line.rstrip().endswith(END_OF_TEXT):
            before = line.rstrip()[: -len(END_OF_TEXT)]
            if current is not None and before.strip():
                record[current].append(before)
            yield record
            record, current = {}, None
            continue
        match = _FIELD_LINE.match(line)
        if match:
            name, value = match.groups()
            if name in record and "Story" in record:  # a new record with no separator in between
                yield record
                record = {}
            current = name
            record[current] = [value] if value.strip() else []
        elif current is not None:
            record[current].append(line)
    yield record


def instruction_from_fields(fields: dict[str, str]) -> Instruction | None:
    story = fields.get("Story", "").strip()
    if not story:
        return None
    words = _split_list(fields.get("Words", ""))
    features = []
    for name in _split_list(fields.get("Features", "")):
        key = INSTRUCT_FEATURES.get(name.lower().replace(" ", ""))
        features.append(key or re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower())
    extra = []
    if fields.get("Random sentence", "").strip():
        extra.append(f"Use the sentence: {fields['Random sentence'].strip()}")
    if fields.get("Summary", "").strip():
        extra.append(f"Summary: {fields['Summary'].strip()}")
    return Instruction(make_prompt(words, tuple(features), tuple(extra)), story, words, tuple(features))


def instructions_from_instruct_file(path: Path) -> list[Instruction]:
    """The records of a TinyStoriesInstruct .txt file that have a story, in file order."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    out = []
    for record in _instruct_records(text):
        fields = {name: "\n".join(lines).strip() for name, lines in record.items()}
        instruction = instruction_from_fields(fields)
        if instruction is not None:
            out.append(instruction)
    return out


def heldout_split(instructions: list, eval_count: int, seed: int) -> tuple[list, list]:
    """(eval set, the rest): a seeded permutation's first `eval_count`, then the others in that order.

    GRPO samples its training prompts from the rest and evaluates on the eval set;
    `dsjax eval --prompts N --seed S` takes the first N of the same permutation, so with
    N <= grpo.eval_prompts (and S = training.seed) it never scores a GRPO training prompt.
    """
    order = np.random.default_rng(seed).permutation(len(instructions))
    ordered = [instructions[i] for i in order]
    return ordered[:eval_count], ordered[eval_count:]
