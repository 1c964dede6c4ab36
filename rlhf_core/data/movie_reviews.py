"""The embedded offline task: movie reviews steered positive by a sentiment judge.

A seeded template grammar writes short, regular reviews that a ~100k-parameter model can learn
in a minute on a CPU, and a pure-Python lexicon scorer (:func:`gold_score`) plays the "true"
human judge. The reward model only ever sees noisy preference labels sampled from that judge,
so reward hacking (a learned reward that disagrees with the judge) shows in the gold score.

Text conventions (every split follows them):
- a prompt is a review opener with no trailing space (``"Review of The Silent River:"``);
- a response/completion starts with a space and ends with ``"."`` (``" the acting was great."``),
  so ``prompt + completion`` is the document; the phases append the EOS token themselves.
- eval prompts use movie titles that no training prompt, SFT or preference record mentions
  (the corpus does mention them, so their tokens are known to the pretrained model).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

from ..config import TaskConfig
from .tasks import Task

# ----------------------------------------------------------------------------------------------
# Lexicon: small on purpose (BPE vocab 512 holds nearly every word as one token)
# ----------------------------------------------------------------------------------------------
TITLE_ADJ = ["Red", "Lost", "Cold", "Dark", "Blue", "Silent", "Golden"]
TITLE_NOUN = ["River", "Road", "Star", "Moon", "Sea", "Garden", "Winter"]
ACTORS = ["Anna", "Tom", "Mia", "Leo", "Sam", "Ben"]
GENRES = ["drama", "comedy", "thriller", "western", "musical", "mystery"]
ASPECTS = ["acting", "plot", "story", "music", "ending", "script", "cast"]
ROLES = ["hero", "villain", "king", "doctor", "mother"]
POS_ADJ = ["good", "great", "funny", "lovely", "moving", "clever", "smart", "superb"]
NEG_ADJ = ["bad", "boring", "awful", "dull", "weak", "silly", "slow", "poor"]
NEU_ADJ = ["long", "short", "quiet", "loud", "simple"]
POS_VERB = {"loved": "love", "liked": "like"}
NEG_VERB = {"hated": "hate"}
NEGATORS = frozenset({"not", "never"})
INTENSIFIERS = frozenset({"very", "really"})
FUNCTION_WORDS = ("the a an and but it is was i would did of on in to with for about as my "
                  "what think thoughts review watched saw last night film movie plays felt").split()
PUNCT = frozenset(".,:!?;")

# Word -> polarity. "recommend" is positive so "would not recommend" is negative via negation.
POLARITY: dict[str, float] = {w: 1.0 for w in POS_ADJ}
POLARITY.update({w: -1.0 for w in NEG_ADJ})
POLARITY.update({w: 1.0 for pair in POS_VERB.items() for w in pair})
POLARITY.update({w: -1.0 for pair in NEG_VERB.items() for w in pair})
POLARITY["recommend"] = 1.0

KNOWN_WORDS = frozenset(
    [w.lower() for w in TITLE_ADJ + TITLE_NOUN + GENRES + ASPECTS + ROLES + NEU_ADJ + FUNCTION_WORDS]
    + [w.lower() for name in ACTORS for w in name.split()]
    + list(POLARITY) + list(NEGATORS) + list(INTENSIFIERS))
N_EVAL_TITLES = 12  # titles held out for eval prompts
SPECIAL_TOKENS = ("<pad>", "</s>", "<s>")

_TOKEN = re.compile(r"[a-z]+|\S")


# ----------------------------------------------------------------------------------------------
# The gold judge
# ----------------------------------------------------------------------------------------------
def gold_score(prompt: str, response: str) -> float:
    """The task's ground truth: lexicon sentiment of ``response`` minus degeneracy penalties.

    Sentiment: each lexicon word adds its polarity (±1); a negator ("not", "never") within the
    next 3 words flips it, an intensifier ("very", "really") scales it by 1.5; punctuation ends
    both scopes. A (word, sign) pair counts once, so repeating "great" earns nothing. The sum
    ``s`` is squashed with ``tanh(s / 2)`` (one word ≈ 0.46, three ≈ 0.91). Penalties:
    short text (< 6 words: 0.15 per missing word), non-words (2 × fraction of tokens outside
    the task's vocabulary, e.g. digits or byte garbage), repetition (2.5 × how far the distinct-word
    ratio falls below 0.6, plus 0.2 per immediately repeated word), word salad (2 × how far the
    fraction of sentiment words exceeds 0.5; real sentences are ~1/4 sentiment words), and 0.1
    when the response does not end a sentence. Special-token text (``</s>``, ``<pad>``) is ignored; empty text scores -1.
    The prompt is not used (the judge rates the review); it is part of the reward signature.

    Args:
        prompt: the review opener (unused).
        response: the generated continuation.

    Returns:
        A float in [-1, 1]; higher is a more positive, well-formed review.
    """
    for tok in SPECIAL_TOKENS:
        if tok in response:
            response = response.replace(tok, " ")
    toks = _TOKEN.findall(response.lower())
    n_words = sum(1 for t in toks if t.isalpha())
    if n_words == 0:
        return -1.0
    total, unknown, repeats, scope, boost, n_sent = 0.0, 0, 0, 0, 1.0, 0
    seen: set[tuple[str, bool]] = set()
    words: set[str] = set()
    prev = ""
    for t in toks:
        if t in PUNCT:
            scope, boost, prev = 0, 1.0, t
            continue
        if t == prev:
            repeats += 1
        prev = t
        words.add(t)
        pol = POLARITY.get(t)
        if pol is not None:
            n_sent += 1
            if scope:
                pol = -pol
            key = (t, pol > 0)
            if key not in seen:
                seen.add(key)
                total += pol * boost
            scope, boost = 0, 1.0
        elif t in NEGATORS:
            scope = 3
        elif t in INTENSIFIERS:
            boost = 1.5
        else:
            scope = max(scope - 1, 0)
            if t not in KNOWN_WORDS:
                unknown += 1
    score = math.tanh(total / 2.0)
    score -= 0.15 * max(0, 6 - n_words)
    score -= 2.0 * unknown / len(toks)
    score -= 2.5 * max(0.0, 0.6 - len(words) / n_words) + 0.2 * repeats
    score -= 2.0 * max(0.0, n_sent / n_words - 0.5)
    if toks[-1] not in (".", "!", "?"):
        score -= 0.1
    return max(-1.0, min(1.0, score))


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The gold judge as a reward callable (``list[str], list[str] -> list[float]``).

    Args:
        prompts: one prompt per response (unused by the judge).
        responses: generated continuations.

    Returns:
        ``[gold_score(p, r) for p, r in zip(prompts, responses)]``.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"gold_reward: {len(prompts)} prompts but {len(responses)} responses")
    return [gold_score(p, r) for p, r in zip(prompts, responses)]


# ----------------------------------------------------------------------------------------------
# The review grammar
# ----------------------------------------------------------------------------------------------
PROMPT_SHAPES: list[Callable[[str, str], str]] = [
    lambda t, g: f"Review of {t}:",
    lambda t, g: f"I watched {t} and",
    lambda t, g: f"My thoughts on {t}:",
    lambda t, g: f"{t} is a {g}, and",
    lambda t, g: f"Last night I saw {t}.",
    lambda t, g: f"What I think of {t}:",
]


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _adj(rng: random.Random, p: int) -> str:
    return rng.choice(POS_ADJ if p > 0 else NEG_ADJ if p < 0 else NEU_ADJ)


def _phrase(rng: random.Random, p: int) -> str:
    """A predicate phrase of polarity p: "great", "very good" or "not boring"."""
    r = rng.random()
    if p != 0 and r < 0.2:
        return "not " + _adj(rng, -p)
    if p != 0 and r < 0.35:
        return rng.choice(("very ", "really ")) + _adj(rng, p)
    return _adj(rng, p)


def _sentence(rng: random.Random, p: int) -> str:
    """One sentence of polarity p in {-1, 0, +1}, ending with "."."""
    k = rng.randrange(7)
    if k == 0:
        return f"the {rng.choice(ASPECTS)} was {_phrase(rng, p)}."
    if k == 1:
        a, b = rng.sample(ASPECTS, 2)
        return f"the {a} and the {b} felt {_phrase(rng, p)}."
    if k == 2:
        return f"{rng.choice(ACTORS)} was {_phrase(rng, p)} as the {rng.choice(ROLES)}."
    if k == 3:
        return f"it is {_article(_adj(rng, p))} {rng.choice(GENRES)}."
    if k == 4:
        return f"the film was {_phrase(rng, p)}."
    if k == 5 and p != 0:
        return f"the {rng.choice(ASPECTS)} is {_phrase(rng, p)} and {_phrase(rng, p)}."
    if p > 0:
        return rng.choice((f"I {rng.choice(list(POS_VERB))} it.", "I would recommend it.",
                           f"I did not {rng.choice(list(NEG_VERB.values()))} it."))
    if p < 0:
        return rng.choice((f"I {rng.choice(list(NEG_VERB))} it.", "I would not recommend it.",
                           f"I did not {rng.choice(list(POS_VERB.values()))} it."))
    return rng.choice((f"{rng.choice(ACTORS)} plays the {rng.choice(ROLES)}.",
                       f"the film is about {_article(rng.choice(ROLES))}."))


# Sentence polarities per review kind; SFT draws kinds so its mean gold score is about 0.
_KINDS: dict[str, Callable[[random.Random], list[int]]] = {
    "positive": lambda r: [1, 1] + _extra(r, 1),
    "negative": lambda r: [-1, -1] + _extra(r, -1),
    "mixed": lambda r: [1, -1] + ([0] if r.random() < 0.5 else []),
    "neutral": lambda r: [0, 0] + ([0] if r.random() < 0.5 else []),
}
SFT_KIND_WEIGHTS = {"positive": 0.35, "negative": 0.35, "mixed": 0.15, "neutral": 0.15}


def _extra(rng: random.Random, p: int) -> list[int]:
    """Optional third sentence: same polarity, neutral, or none."""
    r = rng.random()
    return [p] if r < 0.3 else [0] if r < 0.6 else []


def make_review(rng: random.Random, kind: str, min_words: int = 8, max_words: int = 20) -> str:
    """A response of the given kind ("positive", "negative", "mixed", "neutral"), leading space.

    Args:
        rng: the random stream to draw from.
        kind: one of the keys of ``_KINDS``.
        min_words, max_words: resample until the word count falls in this range.

    Returns:
        e.g. ``" the acting was great. I loved it."``.
    """
    for _ in range(100):
        pols = _KINDS[kind](rng)
        rng.shuffle(pols)
        text = " " + " ".join(_sentence(rng, p) for p in pols)
        if min_words <= len(text.split()) <= max_words:
            return text
    return text


def _degenerate(rng: random.Random) -> str:
    """A reward-hacking-shaped response: repetition, a fragment, or junk."""
    k = rng.randrange(3)
    if k == 0:
        word = rng.choice(POS_ADJ)
        return " " + " ".join([word] * rng.randint(4, 10)) + "."
    if k == 1:
        return " " + rng.choice(POS_ADJ) + "."
    words = make_review(rng, "positive").split()
    return " " + " ".join(w[: rng.randint(1, 3)] + str(rng.randint(0, 9)) for w in words)


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------
@dataclass
class MovieReviewTask(Task):
    """Every split of the movie-review task (see the module docstring for text conventions); the
    corpus holds the raw review documents for phase 0."""

    def gold_score(self, prompt: str, response: str) -> float:
        return gold_score(prompt, response)


def _prompt_pool(titles: list[str], genre: dict[str, str], rng: random.Random) -> list[str]:
    """Every opener shape for every title (each title has one genre), shuffled."""
    pool = [shape(t, genre[t]) for t in titles for shape in PROMPT_SHAPES]
    rng.shuffle(pool)
    return pool


def _cycle(pool: list[str], n: int) -> list[str]:
    return [pool[i % len(pool)] for i in range(n)]


def _preference(rng: random.Random, prompt: str, label_noise: float) -> dict:
    """Two responses with gold scores at least 0.1 apart; label from the judge, flipped w.p. noise."""
    while True:
        r = rng.random()
        if r < 0.7:  # clearly separable: different sentiment kinds
            ka, kb = rng.sample(list(_KINDS), 2)
            a, b = make_review(rng, ka), make_review(rng, kb)
        elif r < 0.9:  # harder: same kind, different intensity
            kind = rng.choice(list(_KINDS))
            a, b = make_review(rng, kind), make_review(rng, kind)
        else:  # degenerate text the reward model must learn to dislike
            a, b = make_review(rng, rng.choice(("neutral", "mixed", "positive"))), _degenerate(rng)
        ga, gb = gold_score(prompt, a), gold_score(prompt, b)
        if abs(ga - gb) >= 0.1:
            break
    chosen, rejected = (a, b) if ga > gb else (b, a)
    if rng.random() < label_noise:
        chosen, rejected = rejected, chosen
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def generate_task(cfg: TaskConfig | None = None, seed: int = 0, tokenizer: Any = None) -> MovieReviewTask:
    """Generate every split of the movie-review task, deterministically from ``seed``.

    Each split draws from its own stream (``random.Random(f"{seed}/split")``) so changing one
    size leaves the other splits unchanged. 12 of the 49 titles are held out for eval prompts
    (72 distinct eval openers; larger ``n_eval_prompts`` repeat them).

    Args:
        cfg: sizes and label noise (``rlhf_core.config.TaskConfig``); defaults when None.
        seed: the task seed.
        tokenizer: unused (the prompts are plain text); the signature every task module shares.

    Returns:
        A :class:`MovieReviewTask`.
    """
    cfg = cfg or TaskConfig()
    cfg.validate()
    titles = [f"The {a} {n}" for a in TITLE_ADJ for n in TITLE_NOUN]
    random.Random(f"{seed}/titles").shuffle(titles)
    train_titles, eval_titles = titles[N_EVAL_TITLES:], titles[:N_EVAL_TITLES]
    genre = {t: GENRES[i % len(GENRES)] for i, t in enumerate(titles)}

    rng = random.Random(f"{seed}/corpus")
    all_prompts = _prompt_pool(titles, genre, rng)
    corpus = [rng.choice(all_prompts) + make_review(rng, rng.choice(list(_KINDS)), 8, 30)
              for _ in range(cfg.n_corpus)]

    train_pool = _prompt_pool(train_titles, genre, random.Random(f"{seed}/pool"))
    rng = random.Random(f"{seed}/sft")
    kinds, weights = list(SFT_KIND_WEIGHTS), list(SFT_KIND_WEIGHTS.values())
    sft = [{"prompt": rng.choice(train_pool), "completion": make_review(rng, rng.choices(kinds, weights)[0])}
           for _ in range(cfg.n_sft)]

    rng = random.Random(f"{seed}/preferences")
    preferences = [_preference(rng, rng.choice(train_pool), cfg.label_noise)
                   for _ in range(cfg.n_preferences)]

    prompts = _cycle(train_pool, cfg.n_prompts)
    eval_prompts = _cycle(_prompt_pool(eval_titles, genre, random.Random(f"{seed}/eval")), cfg.n_eval_prompts)
    return MovieReviewTask(sft=sft, preferences=preferences, prompts=prompts, eval_prompts=eval_prompts,
                           corpus=corpus)
