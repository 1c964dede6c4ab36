"""Data: the embedded movie-review task, the tiny tokenizer and loaders for users' files."""
from .loaders import FORMATS, load_or_default, load_records, messages_to_prompt_completion
from .task import TaskData, generate_task, gold_reward, gold_score, write_task
from .tokenizer import train_tokenizer

__all__ = ["FORMATS", "TaskData", "generate_task", "gold_reward", "gold_score", "load_or_default",
           "load_records", "messages_to_prompt_completion", "train_tokenizer", "write_task"]
