"""Data: the tasks (named by content), the tiny tokenizer and loaders for users' files.

- ``movie_reviews``: the embedded task of the ``tiny`` preset (raw corpus, SFT, preferences,
  prompts, a sentiment judge); ``short_questions``: the ``smollm2`` preset's Q&A task.
- ``tasks.Task``: what every task gives the pipeline (splits, gold judge, reward-model format).
"""
from .loaders import FORMATS, load_or_default, load_records, messages_to_prompt_completion
from .movie_reviews import MovieReviewTask
from .short_questions import ShortQuestionTask
from .tasks import Task
from .tokenizer import train_tokenizer

__all__ = ["FORMATS", "MovieReviewTask", "ShortQuestionTask", "Task", "load_or_default", "load_records",
           "messages_to_prompt_completion", "train_tokenizer"]
