"""The short-question task: arithmetic and factual questions with a programmatic gold judge
(correct, brief, polite); the task of the ``smollm2`` preset (real weights).

Seeded and offline. SFT answers mix five styles on purpose (polite, plain, verbose, rude, wrong) so
the SFT policy has room to improve; preferences are labelled by the gold judge with label noise; the
held-out questions never appear in training data. Used by ``rlhf pipeline --preset smollm2``.

Formats: SFT pairs and PPO prompts are in the policy's chat format (its chat template, with a
system prompt); the reward model reads plain text, "Question: ...\nAnswer:" + " answer"
(:meth:`ShortQuestionTask.reward_text`), in its own tokenizer.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from ..config import TaskConfig
from ..errors import ConfigError
from .tasks import Task

# ----------------------------------------------------------------------------------------------
# The real task: answer correctly, briefly and politely (gold judge held out from training)
# ----------------------------------------------------------------------------------------------
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "England": "London", "Greece": "Athens",
            "Canada": "Ottawa", "Portugal": "Lisbon", "Austria": "Vienna", "Norway": "Oslo", "Ireland": "Dublin",
            "Poland": "Warsaw", "Sweden": "Stockholm", "Kenya": "Nairobi", "Peru": "Lima", "Cuba": "Havana"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
             "old": "young", "wet": "dry", "open": "closed", "early": "late", "full": "empty", "hard": "soft",
             "high": "low", "rich": "poor", "strong": "weak", "long": "short"}
COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
          "blood": "red", "an orange": "orange", "a lemon": "yellow", "milk": "white", "a strawberry": "red"}
LEGS = {"a spider": 8, "a dog": 4, "a bird": 2, "an ant": 6, "a cat": 4, "a horse": 4, "a chicken": 2,
        "a bee": 6, "an octopus": 8, "a cow": 4}
POLITE = ("sure", "of course", "happy to help", "certainly", "glad", "great question", "please", "thank")
RUDE = ("obviously", "ugh", "everyone knows", "seriously", "look it up", "duh", "whatever", "stupid")
SYSTEM_PROMPT = "You are a helpful assistant."
MAX_BRIEF_WORDS = 12

_NUM = re.compile(r"-?\d+")
_USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)


def questions() -> list[tuple[str, str, str]]:
    """Every (question, answer, core sentence) of the task, in a fixed order."""
    out = [(f"What is {a} + {b}?", str(a + b), f"{a} + {b} = {a + b}.") for a in range(1, 16) for b in range(1, 16)]
    out += [(f"What is {a} minus {b}?", str(a - b), f"{a} minus {b} is {a - b}.")
            for a in range(5, 20) for b in range(1, 5)]
    out += [(f"What is {a} times {b}?", str(a * b), f"{a} times {b} is {a * b}.")
            for a in range(2, 10) for b in range(2, 6)]
    out += [(f"What is the capital of {c}?", x, f"The capital of {c} is {x}.") for c, x in CAPITALS.items()]
    out += [(f"What is the opposite of {w}?", o, f"The opposite of {w} is {o}.") for w, o in OPPOSITES.items()]
    out += [(f"What color is {t}?", c, f"{t[0].upper() + t[1:]} is {c}.") for t, c in COLORS.items()]
    out += [(f"How many legs does {a} have?", str(n), f"{a[0].upper() + a[1:]} has {n} legs.") for a, n in LEGS.items()]
    return out


ANSWERS = {q: a for q, a, _ in questions()}


def question_of(prompt: str) -> str:
    """The question inside a chat-formatted prompt, an RM prompt ("Question: ...\\nAnswer:") or plain text."""
    m = _USER.search(prompt)
    text = m.group(1) if m else prompt
    return text.replace("Question:", "").replace("Answer:", "").strip()


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def gold_parts(prompt: str, response: str) -> dict[str, float]:
    """The judge's components: correct (1/0), polite (1/0), rude (1/0), words (count)."""
    question, low = question_of(prompt), response.lower()
    answer = ANSWERS.get(question, "")
    if answer.lstrip("-").isdigit():  # right number present, no number that is neither operand nor answer
        nums = _NUM.findall(response)
        allowed = {answer, *_NUM.findall(question)}
        correct = answer in nums and all(n in allowed for n in nums)
    else:
        correct = bool(answer) and re.search(rf"\b{re.escape(answer.lower())}\b", low) is not None
    return {"correct": float(correct), "polite": float(_has_any(low, POLITE)),
            "rude": float(_has_any(low, RUDE)), "words": float(len(_words(response)))}


def _has_any(text: str, phrases: tuple[str, ...]) -> bool:
    """Whole-word match: "ugh" is rude, the end of "thorough" is not."""
    return any(re.search(rf"\b{re.escape(p)}\b", text) for p in phrases)


def gold_score(prompt: str, response: str) -> float:
    """The true judge, never seen by SFT/RM/PPO: 0.6·correct + 0.3·polite − 0.5·rude
    − 0.02 per word beyond 12 (at most 0.5) − 0.2 when wrong − 0.1 when the text does not end a
    sentence (a truncated answer); empty text scores −1.  Best ≈ 0.9 ("Sure! 7 + 5 = 12.")."""
    if not _words(response):
        return -1.0
    p = gold_parts(prompt, response)
    score = 0.6 * p["correct"] - 0.2 * (1 - p["correct"]) + 0.3 * p["polite"] - 0.5 * p["rude"]
    score -= min(0.5, 0.02 * max(0.0, p["words"] - MAX_BRIEF_WORDS))
    if not response.rstrip().endswith((".", "!", "?")):
        score -= 0.1
    return max(-1.0, min(1.0, score))


def _answer(rng: random.Random, style: str, question: str, core: str) -> str:
    """One answer in a style: polite, plain, verbose, rude or wrong (polite but incorrect)."""
    answer = ANSWERS[question]
    if style == "plain":
        return answer[0].upper() + answer[1:] + "." if rng.random() < 0.5 else core
    if style == "verbose":
        return (f"Let me think about this question carefully and explain it step by step, because it is "
                f"always a good idea to be thorough. {core} That is the final answer, and I hope this "
                f"long and detailed explanation was useful to you.")
    if style == "rude":
        return f"{rng.choice(['Obviously,', 'Ugh, fine.', 'Everyone knows this.', 'Seriously?'])} {core}"
    if style == "wrong":
        other = rng.choice([a for a in ANSWERS.values() if a != answer and a.isdigit() == answer.isdigit()])
        core = core.replace(answer, other) if core.count(answer) == 1 else f"{other}."
    return f"{rng.choice(['Sure!', 'Of course!', 'Happy to help!', 'Certainly!', 'Great question!'])} {core}"


STYLE_WEIGHTS = {"polite": 0.25, "plain": 0.25, "verbose": 0.2, "rude": 0.2, "wrong": 0.1}


@dataclass
class ShortQuestionTask(Task):
    """Every split: SFT pairs and PPO prompts in the policy's chat format; RM preferences as
    plain text ("Question: ...\nAnswer:" + " answer") for the reward model's own tokenizer.
    No corpus: the preset's model is already pretrained."""

    def gold_score(self, prompt: str, response: str) -> float:
        return gold_score(prompt, response)

    def gold_parts(self, prompt: str, response: str) -> dict[str, float]:
        return gold_parts(prompt, response)

    def shown_prompt(self, prompt: str) -> str:
        return question_of(prompt)

    def reward_text(self, prompts: list[str], responses: list[str]) -> tuple[list[str], list[str]]:
        """The chat prompt becomes "Question: ...\nAnswer:", the answer " " + its stripped text."""
        return [rm_prompt(question_of(p)) for p in prompts], [" " + r.strip() for r in responses]


def rm_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def chat_prompt(tokenizer: Any, question: str) -> str:
    """The policy's prompt: system + user turn + the assistant header (the chat template)."""
    if tokenizer is None:
        return question
    return tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                          {"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)


def generate_task(cfg: TaskConfig, seed: int = 0, tokenizer: Any = None) -> ShortQuestionTask:
    """Seeded splits: ``cfg.n_eval_prompts`` questions held out first, the rest train SFT (mixed
    styles), preferences (two styles, labelled by the gold judge, flipped w.p. ``cfg.label_noise``)
    and PPO prompts.  ``tokenizer`` supplies the chat template (None: bare questions)."""
    pool = questions()
    random.Random(f"{seed}/real-split").shuffle(pool)
    held, train = pool[:cfg.n_eval_prompts], pool[cfg.n_eval_prompts:]
    if not train:
        raise ConfigError(f"task.n_eval_prompts={cfg.n_eval_prompts}: leaves no training questions (of {len(pool)})")
    rng = random.Random(f"{seed}/real-sft")
    styles, weights = list(STYLE_WEIGHTS), list(STYLE_WEIGHTS.values())
    sft = []
    for _ in range(cfg.n_sft):
        q, _, core = rng.choice(train)
        style = rng.choices(styles, weights)[0]
        sft.append({"prompt": chat_prompt(tokenizer, q), "completion": _answer(rng, style, q, core)})
    rng = random.Random(f"{seed}/real-preferences")
    preferences = []
    while len(preferences) < cfg.n_preferences:
        q, _, core = rng.choice(train)
        a, b = (_answer(rng, s, q, core) for s in rng.sample(styles, 2))
        ga, gb = gold_score(q, a), gold_score(q, b)
        if abs(ga - gb) < 0.1:
            continue
        chosen, rejected = (a, b) if (ga > gb) != (rng.random() < cfg.label_noise) else (b, a)
        preferences.append({"prompt": rm_prompt(q), "chosen": " " + chosen, "rejected": " " + rejected})
    rng = random.Random(f"{seed}/real-prompts")
    prompts = [chat_prompt(tokenizer, rng.choice(train)[0]) for _ in range(cfg.n_prompts)]
    return ShortQuestionTask(sft=sft, preferences=preferences, prompts=prompts,
                             eval_prompts=[chat_prompt(tokenizer, q) for q, _, _ in held])
