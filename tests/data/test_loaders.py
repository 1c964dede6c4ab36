"""Loaders: every format from JSONL / JSON / parquet / a datasets folder, and one clear DataError
line (file, record number, field) for each kind of bad input."""
import json

import datasets
import pytest

from rlhf_core.data.loaders import (FORMATS, load_or_default, load_records,
                                    messages_to_prompt_completion)
from rlhf_core.data.tokenizer import train_tokenizer
from rlhf_core.errors import ConfigError, DataError

CHAT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Review of The Red Sea:"},
        {"role": "assistant", "content": "the plot was good."}]
GOOD = {
    "text": [{"text": "Review of The Red Sea: the plot was good."}, {"text": "the music was dull."}],
    "prompt_completion": [{"prompt": "Review of X:", "completion": " good."},
                          {"prompt": "Review of Y:", "completion": " bad.", "extra": 1}],
    "messages": [{"messages": CHAT}, {"messages": CHAT[1:]}],
    "preference": [{"prompt": "Review of X:", "chosen": " good.", "rejected": " bad."}] * 2,
    "prompt": [{"prompt": "Review of X:"}, {"prompt": "I watched Y and"}],
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def expected(fmt):
    return [{k: r[k] for k in FORMATS[fmt]} for r in GOOD[fmt]]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_from_jsonl_json_parquet_and_datasets_folder(fmt, tmp_path):
    ds = datasets.Dataset.from_list(GOOD[fmt])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "d.json").write_text(json.dumps(GOOD[fmt]))
    sources = [write_jsonl(tmp_path / "d.jsonl", GOOD[fmt]), tmp_path / "d.json",
               tmp_path / "d.parquet", tmp_path / "folder", tmp_path / "dict"]
    for src in sources:
        got = load_records(str(src), fmt)
        if fmt == "prompt_completion":  # parquet/datasets fill the missing 'extra' with None: dropped
            assert all(set(r) == {"prompt", "completion"} for r in got)
        assert got == expected(fmt), src


def test_blank_lines_skipped_and_line_numbers_kept(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a"}\n\n   \n{"prompt": ""}\n')
    with pytest.raises(DataError) as e:
        load_records(p, "prompt")
    assert str(e.value).startswith(f"{p}:4: field 'prompt'")
    p.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert load_records(p, "prompt") == [{"prompt": "a"}, {"prompt": "b"}]


def test_load_or_default(tmp_path):
    default = [{"prompt": "x"}]
    assert load_or_default("", "prompt", default) is default
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "y"}])
    assert load_or_default(str(p), "prompt", default) == [{"prompt": "y"}]


def test_unknown_format_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown data format"):
        load_records(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "y"}]), "chat")


# ---- bad inputs: (file contents, format, record number, substring of the problem) -------------
BAD_JSONL = [
    ('{"prompt": "a"}\n{"prompt": "b"\n', "prompt", 2, "not valid JSON"),
    ('{"prompt": "a"}\n["a"]\n', "prompt", 2, "got a list"),
    ('"just a string"\n', "text", 1, "got a string"),
    ('{"prompt": "a", "response": "b"}\n', "prompt_completion", 1, "'response': rename it to 'completion'"),
    ('{"prompt": "a", "completon": "b"}\n', "prompt_completion", 1, "'completon': rename it"),
    ('{"prompt": "a"}\n{"question": "b"}\n', "prompt", 2, "'question': rename it to 'prompt'"),
    ('{"txt": "a"}\n', "text", 1, "missing field"),
    ('{"prompt": 7}\n', "prompt", 1, "expected a string, got an int"),
    ('{"prompt": "a", "completion": null}\n', "prompt_completion", 1, "expected a string, got null"),
    ('{"prompt": "   "}\n', "prompt", 1, "empty string"),
    ('{"prompt": "a", "completion": ""}\n', "prompt_completion", 1, "empty string"),
    ('{"text": "a"}\n{"text": ""}\n', "text", 2, "empty string"),
    ('{"prompt": "p", "chosen": "x", "rejected": "x"}\n', "preference", 1, "identical to 'chosen'"),
    ('{"prompt": "p", "chosen": "x", "rejected": ["x"]}\n', "preference", 1, "expected a string"),
    ('{"messages": "hi"}\n', "messages", 1, "non-empty list"),
    ('{"messages": []}\n', "messages", 1, "empty list"),
    ('{"messages": ["hi"]}\n', "messages", 1, "expected an object {role, content}"),
    ('{"messages": [{"role": "bot", "content": "x"}]}\n', "messages", 1, "got 'bot'"),
    ('{"messages": [{"role": "user", "text": "x"}]}\n', "messages", 1, "missing field"),
    ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}\n',
     "messages", 1, "last turn must be the assistant"),
    ('{"conversation": []}\n', "messages", 1, "'conversation': rename it to 'messages'"),
]


@pytest.mark.parametrize("content,fmt,record,problem", BAD_JSONL)
def test_bad_jsonl_record_names_file_record_and_problem(content, fmt, record, problem, tmp_path):
    p = tmp_path / "users_data.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records(p, fmt)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{record}") and problem in msg and "\n" not in msg
    assert e.value.record == record


def test_field_is_named_in_errors(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": 3},
                                                         {"role": "assistant", "content": "a"}]}])
    with pytest.raises(DataError, match=r"m\.jsonl:1: field 'messages\[0\]\.content': expected a string"):
        load_records(p, "messages")
    p = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "output": "b"}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'completion': missing field \(found 'output'"):
        load_records(p, "prompt_completion")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_records(tmp_path / "nope.jsonl", "text")


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.jsonl", "\n\n  \n"), ("e.json", "[]"),
                                          ("e.json", "")])
def test_empty_file(name, content, tmp_path):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DataError, match="no records"):
        load_records(p, "text")


def test_non_utf8_names_the_line(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:3: line 3 is not valid UTF-8 \(byte 0xe9\)"):
        load_records(p, "text")
    p = tmp_path / "latin.json"
    p.write_bytes(b'[\n{"text": "ok"},\n{"text": "caf\xe9"}\n]')
    with pytest.raises(DataError, match=r"latin\.json:3: line 3 is not valid UTF-8"):
        load_records(p, "text")


def test_json_must_be_a_list_and_parse(tmp_path):
    p = tmp_path / "obj.json"
    p.write_text('{"text": "a"}')
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON list of records, got an object"):
        load_records(p, "text")
    p.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError, match=r"obj\.json:2: not valid JSON"):
        load_records(p, "text")
    p.write_text('[{"text": "a"}, {"text": 1}]')
    with pytest.raises(DataError, match=r"obj\.json:2: field 'text': expected a string, got an int"):
        load_records(p, "text")


def test_bad_parquet_datasets_folder_and_suffix(tmp_path):
    p = tmp_path / "bad.parquet"
    p.write_text("not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable parquet file"):
        load_records(p, "text")
    datasets.Dataset.from_list([{"text": "a"}, {"text": ""}]).to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(DataError, match=r"e\.parquet:2: field 'text': empty string"):
        load_records(tmp_path / "e.parquet", "text")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="folder: not a folder written by datasets"):
        load_records(tmp_path / "folder", "text")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_records(write_jsonl(tmp_path / "d.csv", [{"text": "a"}]), "text")


def test_messages_to_prompt_completion():
    tok = train_tokenizer(["User: Review of The Red Sea:\nAssistant: the plot was good."] * 5)
    out = messages_to_prompt_completion(GOOD["messages"], tok)
    assert out[0] == {"prompt": "System: Be kind.\nUser: Review of The Red Sea:\nAssistant:",
                      "completion": " the plot was good."}
    assert out[1]["prompt"] == "User: Review of The Red Sea:\nAssistant:"
    # prompt + completion + EOS is exactly the template's rendering of the conversation
    assert out[1]["prompt"] + out[1]["completion"] + tok.eos_token + "\n" == \
        tok.apply_chat_template(CHAT[1:], tokenize=False)
