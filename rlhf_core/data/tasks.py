"""What a task is to the pipeline: its splits, its gold judge, and how it is written to disk.

A task module (``movie_reviews``, ``short_questions``) generates one :class:`Task` subclass from
a seed. The phases read the splits they train on (a phase whose data field is empty uses the
task's split) and the judge, which no phase ever trains on: it only evaluates, so reward
hacking (a learned reward that disagrees with the judge) shows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Task:
    """Every split of a task, in TRL's record formats."""
    sft: list[dict]  # {"prompt": str, "completion": str}
    preferences: list[dict]  # {"prompt": str, "chosen": str, "rejected": str}
    prompts: list[str]  # PPO training prompts
    eval_prompts: list[str]  # held-out PPO prompts (never in `prompts`), for the gold evaluation
    corpus: list[str] = field(default_factory=list)  # raw documents for phase 0 (empty: no phase 0)

    def gold_score(self, prompt: str, response: str) -> float:
        """The judge's score of one response (higher is better)."""
        raise NotImplementedError

    def gold_reward(self, prompts: list[str], responses: list[str]) -> list[float]:
        """The judge as a reward source: one score per (prompt, response)."""
        return [self.gold_score(p, r) for p, r in zip(prompts, responses)]

    def gold_parts(self, prompt: str, response: str) -> dict[str, float]:
        """The judge's components for one response (e.g. correct, polite); none by default."""
        return {}

    def shown_prompt(self, prompt: str) -> str:
        """The prompt as a reader should see it in a report (without chat markup); as it is by default."""
        return prompt

    def reward_text(self, prompts: list[str], responses: list[str]) -> tuple[list[str], list[str]]:
        """(prompts, responses) as the task's reward model reads them (its preference records'
        format); the policy's own text by default."""
        return prompts, responses

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Every non-empty split as JSONL in the loaders' formats: corpus.jsonl ``{"text"}``,
        sft.jsonl ``{"prompt", "completion"}``, preferences.jsonl ``{"prompt", "chosen",
        "rejected"}``, prompts.jsonl and eval_prompts.jsonl ``{"prompt"}``. Returns name -> path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        splits = {"corpus": [{"text": t} for t in self.corpus], "sft": self.sft,
                  "preferences": self.preferences, "prompts": [{"prompt": p} for p in self.prompts],
                  "eval_prompts": [{"prompt": p} for p in self.eval_prompts]}
        paths = {}
        for name, records in splits.items():
            if not records:
                continue
            path = out / f"{name}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            paths[name] = path
        return paths
