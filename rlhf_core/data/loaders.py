"""Load users' data in TRL's dataset formats and reject bad records with one clear line.

Files: JSONL (``.jsonl``, one object per line; blank lines skipped), a JSON list (``.json``),
parquet (``.parquet``) or a folder written by ``datasets.Dataset.save_to_disk`` (a
``DatasetDict`` folder uses its ``train`` split, or its only split). Record numbers in errors
are 1-based: the line number for JSONL, the position in the list/table otherwise.

Formats (TRL's names) and their fields:
- ``text``: ``{"text"}`` (pretraining);
- ``prompt_completion``: ``{"prompt", "completion"}`` (SFT);
- ``messages``: ``{"messages": [{"role", "content"}, ...]}`` ending with an assistant turn;
- ``preference``: ``{"prompt", "chosen", "rejected"}`` (reward model), strings or TRL's
  conversational forms (``prompt`` a list of turns ending with the user's, ``chosen``/``rejected``
  lists ending with an assistant turn, whose content is kept; or, with the prompt implicit,
  ``chosen``/``rejected`` two whole conversations that differ only in their last, assistant,
  turn): the reward phase renders those
  with the reward model's chat template (``reward_sources.chat_pair``);
- ``prompt``: ``{"prompt"}`` (PPO): a string, or TRL's conversational prompt, a list of
  ``{role, content}`` turns (``{"messages": [...]}`` is read the same way); a conversation is
  rendered with the policy's chat template by the PPO phase (``rlhf_core.phases.ppo.render_prompts``).
Returned records hold only the format's fields (extra fields are dropped, or kept apart under
``"columns"`` with ``keep_columns``). Over-long prompts are the phases' business, not the loader's.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ..errors import ConfigError, DataError

FORMATS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
}

# Names people often use for TRL's fields; a missing field suggests the one the record has.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "text": ("content", "document", "sentence", "body", "review"),
    "prompt": ("question", "input", "instruction", "query", "context", "source"),
    "completion": ("response", "output", "answer", "target", "reply", "label"),
    "chosen": ("preferred", "positive", "better", "accepted", "winner", "good"),
    "rejected": ("dispreferred", "negative", "worse", "loser", "bad"),
    "messages": ("conversation", "conversations", "chat", "dialog", "dialogue", "turns"),
}
ROLES = ("system", "user", "assistant")


def load_records(path: str | Path, fmt: str, keep_columns: bool = False) -> list[dict]:
    """Read ``path`` and validate every record against the format ``fmt``.

    Args:
        path: a ``.jsonl``, ``.json`` or ``.parquet`` file, or a ``save_to_disk`` folder.
        fmt: one of :data:`FORMATS`.
        keep_columns: keep the record's other fields under ``"columns"`` (a dict; TRL passes a dataset's
            extra columns, e.g. a reference answer, to its reward functions).

    Returns:
        The records, each a dict with exactly the format's fields (and ``"columns"`` with ``keep_columns``).

    Raises:
        DataError: the first problem found, naming file, record (1-based) and field.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown data format '{fmt}' (known: {', '.join(FORMATS)})")
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        numbered = list(enumerate(_read_datasets_folder(path), start=1))
    elif path.suffix == ".jsonl":
        numbered = _read_jsonl(path)
    elif path.suffix == ".json":
        numbered = list(enumerate(_read_json(path), start=1))
    elif path.suffix == ".parquet":
        numbered = list(enumerate(_read_parquet(path), start=1))
    else:
        raise DataError(path, f"unsupported file type '{path.suffix}' "
                              "(expected .jsonl, .json, .parquet or a datasets folder)")
    if not numbered:
        raise DataError(path, "no records (the file is empty)")
    out = [_validate(path, n, rec, fmt) for n, rec in numbered]
    if keep_columns:
        own = set(FORMATS[fmt]) | {"messages"}
        for rec, (_, raw) in zip(out, numbered):
            rec["columns"] = {k: v for k, v in raw.items() if k not in own}
    return out


def load_or_default(path: str, fmt: str, default: list[dict]) -> list[dict]:
    """``default`` when ``path`` is empty (the embedded task), else :func:`load_records`.

    Args:
        path: user's data path, or "" for the default.
        fmt: one of :data:`FORMATS`.
        default: records to use when no path is given.

    Returns:
        The records.
    """
    return default if path == "" else load_records(path, fmt)


def messages_to_prompt_completion(records: list[dict], tokenizer: Any) -> list[dict]:
    """Turn ``messages`` records into prompt/completion pairs with the tokenizer's chat template.

    The prompt is every turn before the last assistant turn, rendered with the generation
    prompt; the completion is the text the full rendering adds after that prompt, minus the
    trailing EOS and whitespace (the phases append EOS) — with the tiny tokenizer's template
    that is ``" " + content``. Templates whose full rendering does not extend the prompt fall
    back to the last assistant message itself.

    Args:
        records: validated ``{"messages": [...]}`` records (see :func:`load_records`).
        tokenizer: a tokenizer with a ``chat_template``.

    Returns:
        ``[{"prompt": str, "completion": str}, ...]``.
    """
    eos = getattr(tokenizer, "eos_token", None) or ""
    out = []
    for rec in records:
        msgs = rec["messages"]
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        completion = msgs[-1]["content"]
        if full.startswith(prompt):
            tail = full[len(prompt):].rstrip()
            if eos and tail.endswith(eos):
                tail = tail[: -len(eos)]
            if tail.strip():
                completion = tail
        out.append({"prompt": prompt, "completion": completion})
    return out


# ----------------------------------------------------------------------------------------------
# Readers: return raw records; JSONL keeps real line numbers (blank lines are skipped)
# ----------------------------------------------------------------------------------------------
def _decode(path: Path, data: bytes, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + first_line
        raise DataError(path, f"line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x})",
                        record=line) from None


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    out = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        line = _decode(path, raw, first_line=n).strip() if raw.strip() else ""
        if not line:
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(path, f"line {n} is not valid JSON ({e.msg} at column {e.colno})",
                            record=n) from None
    return out


def _read_json(path: Path) -> list[Any]:
    text = _decode(path, path.read_bytes())
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})",
                        record=e.lineno) from None
    if not isinstance(data, list):
        raise DataError(path, f"expected a JSON list of records, got {_kind(data)} "
                              "(use .jsonl for one object per line)")
    return data


def _read_parquet(path: Path) -> list[Any]:
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt/non-parquet files
        raise DataError(path, f"not a readable parquet file ({type(e).__name__}: {e})") from None


def _read_datasets_folder(path: Path) -> list[Any]:
    import datasets  # about a second to import; only save_to_disk folders need it
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError/ValueError for foreign folders
        raise DataError(path, f"not a folder written by datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise DataError(path, f"several splits ({', '.join(splits)}) and none named 'train'")
    return ds.to_list()


# ----------------------------------------------------------------------------------------------
# Validation: one record, first problem wins
# ----------------------------------------------------------------------------------------------
def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "an int", float: "a float", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _suggest(field: str, keys: list[str]) -> str:
    """' (found 'response' — rename it?)' when the record has a likely stand-in for ``field``."""
    keys = [k for k in keys if isinstance(k, str)]
    lowered = {k.lower(): k for k in keys}
    for name in (field, *SYNONYMS.get(field, ())):
        if name in lowered:
            return f" (found '{lowered[name]}': rename it to '{field}'?)"
    close = difflib.get_close_matches(field, keys, n=1, cutoff=0.6)
    return f" (found '{close[0]}': rename it to '{field}'?)" if close else ""


def _text(path: Path, n: int, rec: dict, field: str, where: str = "") -> str:
    """``rec[field]`` as a non-empty string; ``where`` prefixes the field name in errors."""
    label = where + field
    if field not in rec:
        raise DataError(path, f"missing field{_suggest(field, list(rec))}; record has "
                              f"{', '.join(map(str, rec)) or 'no fields'}", record=n, field=label)
    value = rec[field]
    if not isinstance(value, str):
        raise DataError(path, f"expected a string, got {_kind(value)}", record=n, field=label)
    if not value.strip():
        raise DataError(path, "empty string", record=n, field=label)
    return value


def _messages(path: Path, n: int, rec: dict, field: str = "messages", last: str = "assistant") -> list[dict]:
    """``rec[field]`` as validated {role, content} turns; the last turn's role must be ``last``
    ("assistant" for SFT conversations; "user" for a conversational prompt, which the policy answers)."""
    if field not in rec:
        _text(path, n, rec, field)  # raises the missing-field error with its suggestion
    msgs = rec[field]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(path, f"expected a non-empty list of {{role, content}} turns, got "
                              f"{'an empty list' if msgs == [] else _kind(msgs)}", record=n, field=field)
    clean = []
    for i, turn in enumerate(msgs):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(path, f"expected an object {{role, content}}, got {_kind(turn)}",
                            record=n, field=where)
        if turn.get("role") not in ROLES:
            raise DataError(path, f"expected one of {', '.join(ROLES)}, got {turn.get('role')!r}",
                            record=n, field=where + ".role")
        clean.append({"role": turn["role"], "content": _text(path, n, turn, "content", where + ".")})
    if clean[-1]["role"] != last:
        raise DataError(path, f"the last turn must be the {last}'s, got '{clean[-1]['role']}'",
                        record=n, field=f"{field}[{len(clean) - 1}].role")
    return clean


def _validate(path: Path, n: int, rec: Any, fmt: str) -> dict:
    if not isinstance(rec, dict):
        raise DataError(path, f"expected an object with fields {', '.join(FORMATS[fmt])}, "
                              f"got {_kind(rec)}", record=n)
    if fmt == "messages":
        return {"messages": _messages(path, n, rec)}
    if fmt == "prompt" and (isinstance(rec.get("prompt"), list) or ("prompt" not in rec and "messages" in rec)):
        return {"prompt": _messages(path, n, rec, "prompt" if "prompt" in rec else "messages", last="user")}
    if fmt == "preference" and isinstance(rec.get("prompt"), list):  # TRL's conversational preference
        out = {"prompt": _messages(path, n, rec, "prompt", last="user")}
        out.update({k: _messages(path, n, rec, k)[-1]["content"] for k in ("chosen", "rejected")})
    elif fmt == "preference" and "prompt" not in rec and isinstance(rec.get("chosen"), list):  # implicit prompt
        chosen, rejected = _messages(path, n, rec, "chosen"), _messages(path, n, rec, "rejected")
        if len(chosen) < 2 or chosen[:-1] != rejected[:-1] or chosen[-2]["role"] != "user":
            raise DataError(path, "chosen and rejected must be the same conversation, ending with a user turn, "
                                  "then each one's assistant answer", record=n, field="rejected")
        out = {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}
    else:
        out = {field: _text(path, n, rec, field) for field in FORMATS[fmt]}
    if fmt == "preference" and out["chosen"] == out["rejected"]:
        raise DataError(path, "identical to 'chosen' (a preference needs two different responses)",
                        record=n, field="rejected")
    return out
