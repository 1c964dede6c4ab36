"""Your own task end to end (#15): evaluation on your prompts (a held-out split or --ppo.eval_prompts),
your gold judge (--ppo.gold file.py:function) or none, and the summary saying where each number is from."""
import json

import pytest

from rlhf_core.cli import main
from rlhf_core.config import PPOConfig
from rlhf_core.errors import DataError
from rlhf_core.phases.ppo import held_out_records, plan_evaluation

JUDGES = '''
def length(prompts, responses):
    return [min(len(r.split()), 10) / 10 for r in responses]

def raises(prompts, responses):
    raise RuntimeError("judge offline")

def short(prompts, responses):
    return [0.0]
'''


def write_prompts(path, n):
    path.write_text("".join(json.dumps({"prompt": f"Question {i}: say something about topic {i}."}) + "\n"
                            for i in range(n)))
    return path


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def ppo_argv(model, out, *flags):
    return ["ppo", "--policy", str(model), "--reward", f"{out.parent / 'judges.py'}:length", "--output-dir", str(out),
            "--ppo.num_iterations", "1", "--ppo.batch_size", "4", "--ppo.num_mini_batches", "1",
            "--ppo.response_length", "4", "--ppo.eval_every", "0", *flags]


def test_the_held_out_split_is_seeded_disjoint_and_at_least_16():
    cfg = PPOConfig(prompts="mine.jsonl", seed=3)
    held = held_out_records(400, cfg)
    assert len(held) == 20 and held == sorted(set(held)) and held == held_out_records(400, cfg)  # 5 %
    assert held != held_out_records(400, PPOConfig(prompts="mine.jsonl", seed=4))
    assert len(held_out_records(40, cfg)) == 16  # at least 16
    with pytest.raises(DataError, match="mine.jsonl: 16 prompts are too few to hold out 16"):
        held_out_records(16, cfg)
    prompts = [f"p{i}" for i in range(40)]
    ev = plan_evaluation(cfg, None, prompts)
    assert set(ev.prompts).isdisjoint(ev.train_prompts) and len(ev.prompts) + len(ev.train_prompts) == 40
    assert ev.gold is None and ev.judge.startswith("none") and "16 of 40 prompts (seed 3" in ev.prompt_source


def test_your_prompts_without_a_judge_report_no_gold_numbers(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "judges.py").write_text(JUDGES)
    out = tmp_path / "run"
    prompts = write_prompts(tmp_path / "mine.jsonl", 40)
    assert main(ppo_argv(tiny_model_dir, out, "--prompts", str(prompts))) == 0
    ppo = json.loads((out / "summary.json").read_text())["ppo"]
    assert "gold_reward_before" not in ppo and "gold_reward_after" not in ppo
    assert ppo["eval_prompts"].startswith(f"held-out split of {prompts}: 16 of 40 prompts (seed 0")
    assert ppo["gold_judge"].startswith("none") and len(ppo["eval_held_out_records"]) == 16
    for key in ("scores_before", "scores_after", "kl_to_ref", "response_length_before", "response_length_after"):
        assert isinstance(ppo[key], float), key
    report = (out / "report.md").read_text()
    assert "held-out split of" in report and "gold_judge" in report
    samples = (out / "ppo" / "samples.md").read_text()
    assert samples.startswith("| prompt | before PPO | after PPO |") and "Question" in samples


def test_your_eval_file_and_your_gold_judge(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "judges.py").write_text(JUDGES)
    out = tmp_path / "run"
    train, evals = write_prompts(tmp_path / "train.jsonl", 8), write_prompts(tmp_path / "eval.jsonl", 5)
    assert main(ppo_argv(tiny_model_dir, out, "--prompts", str(train), "--eval-prompts", str(evals),
                         "--gold", f"{tmp_path / 'judges.py'}:length")) == 0  # = --ppo.eval_prompts, --ppo.gold
    ppo = json.loads((out / "summary.json").read_text())["ppo"]
    assert ppo["eval_prompts"] == f"{evals} (5 prompts)" and ppo["gold_judge"].endswith("judges.py:length")
    assert 0.0 <= ppo["gold_reward_before"] <= 1.0 and "eval_held_out_records" not in ppo
    assert "(gold)" in (out / "ppo" / "samples.md").read_text()


@pytest.mark.parametrize("flags, needle", [
    (["--ppo.eval_prompts", "{empty}"], "empty.jsonl: no records (the file is empty)"),
    (["--ppo.gold", "{judges}:raises"], "gold batch 0: the gold raised RuntimeError: judge offline"),
    (["--ppo.gold", "{judges}:short"], "gold batch 0: expected 16 scores, got 1"),
    (["--ppo.gold", "{judges}:missing"], "ppo.gold '"),
    (["--ppo.gold", "judge"], "ppo.gold='judge': expected '' or 'file.py:function'"),
    (["--prompts", "{few}"], "few.jsonl: 10 prompts are too few to hold out 16"),
])
def test_bad_evaluation_input_is_one_line(tiny_model_dir, tmp_path, capsys, flags, needle):
    judges = tmp_path / "judges.py"
    judges.write_text(JUDGES)
    (tmp_path / "empty.jsonl").write_text("")
    write_prompts(tmp_path / "few.jsonl", 10)
    prompts = write_prompts(tmp_path / "mine.jsonl", 40)
    flags = [f.replace("{empty}", str(tmp_path / "empty.jsonl")).replace("{judges}", str(judges))
             .replace("{few}", str(tmp_path / "few.jsonl")) for f in flags]
    if "--prompts" not in flags:
        flags += ["--prompts", str(prompts)]
    out = tmp_path / "run"
    code = main(ppo_argv(tiny_model_dir, out, *flags))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("error: ") and needle in err, err
    assert not (out / "ppo").exists()  # no policy saved


def test_evaluation_hygiene_rules_of_the_help(tiny_model_dir, tmp_path, capsys):
    """--ppo.eval_prompts' help states the rules: an eval file sharing prompts with training, or in another
    format, is a warning listed in summary.json; a held-out split that would leave fewer prompts to train on
    than it holds out is an error; an over-long eval prompt follows on_long_prompt."""
    (tmp_path / "judges.py").write_text(JUDGES)
    train = write_prompts(tmp_path / "train.jsonl", 8)
    out = tmp_path / "same"
    assert main(ppo_argv(tiny_model_dir, out, "--prompts", str(train), "--eval-prompts", str(train))) == 0
    ppo = json.loads((out / "summary.json").read_text())["ppo"]
    assert ppo["eval_warnings"] == [f"8 of 8 eval prompts ({train}) are also training prompts: what is measured on "
                                    "them is not held out"]
    assert "warning: ppo evaluation: 8 of 8 eval prompts" in capsys.readouterr().err
    convo = tmp_path / "convo.jsonl"
    convo.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    plan = plan_evaluation(PPOConfig(prompts=str(convo), eval_prompts=str(train)), None, ["hi"])
    assert any("the eval prompts are plain strings, the training prompts conversations" in w for w in plan.warnings)
    with pytest.raises(DataError, match="18 prompts are too few to hold out 16 for evaluation: 2 would be left"):
        held_out_records(18, PPOConfig(prompts="mine.jsonl"))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 300}) + "\n")
    out = tmp_path / "long"
    assert main(ppo_argv(tiny_model_dir, out, "--prompts", str(train), "--eval-prompts", str(long),
                         "--ppo.on_long_prompt", "error")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {long}:1: field 'prompt': prompt has ") and "ppo.max_prompt_length=" in err, err
    assert not out.exists()  # caught before anything was written


TRL_REWARDS = '''
CALLS = []

def exact(prompts, completions, answer, **kwargs):
    """TRL's contract: the dataset's `answer` column arrives as a keyword, one value per completion."""
    CALLS.append({"prompts": prompts, "completions": completions, "answer": answer, **kwargs})
    return [1.0 if a is not None and a in c else 0.0 for c, a in zip(completions, answer)]

def chat(prompts, completions, **kwargs):
    CALLS.append({"prompts": prompts, "completions": completions, **kwargs})
    return [float(len(c[0]["content"])) / 10 for c in completions]

def old_style(prompts, responses):
    return [len(r) / 10 for r in responses]
'''


def test_trl_reward_contract_columns_several_functions_and_weights(tiny_model_dir, tmp_path, capsys):
    """A reward written for TRL, fn(prompts, completions, **kwargs), gets the prompt records' other columns;
    several reward sources are summed with --ppo.reward_weights and each is logged; a two-argument function
    still works beside it."""
    code = tmp_path / "rewards.py"
    code.write_text(TRL_REWARDS)
    (tmp_path / "judges.py").write_text(JUDGES)
    prompts = tmp_path / "qa.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Q{i}: say {i}.", "answer": str(i), "level": i % 3}) + "\n"
                               for i in range(40)))
    out = tmp_path / "run"
    argv = ppo_argv(tiny_model_dir, out, "--prompts", str(prompts), "--ppo.reward",
                    f"{code}:exact,{code}:old_style", "--ppo.reward_weights", "2,0.5")
    assert main(argv) == 0, capsys.readouterr().err
    from rlhf_core.user_code import load_user_function
    calls = load_user_function(f"{code}:exact").__globals__["CALLS"]
    first = calls[0]
    assert set(first) == {"prompts", "completions", "answer", "level"}
    by_prompt = {p: (a, lv) for p, a, lv in zip(first["prompts"], first["answer"], first["level"])}
    for p, (a, lv) in by_prompt.items():
        i = int(p[1:p.index(":")])
        assert (a, lv) == (str(i), i % 3)  # each completion gets its own record's columns
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["phase"] == "ppo" and "loss/policy" in r]
    parts = trained[-1]
    assert {"objective/reward/exact", "objective/reward/old_style"} <= set(parts)
    want = 2 * parts["objective/reward/exact"] + 0.5 * parts["objective/reward/old_style"]
    assert abs(parts["objective/scores"] - want) < 1e-5
    bad = ppo_argv(tiny_model_dir, tmp_path / "bad", "--prompts", str(prompts), "--ppo.reward",
                   f"{code}:exact,{code}:old_style", "--ppo.reward_weights", "1")
    assert main(bad) == 2
    assert "ppo.reward_weights: 1 weights for 2 reward sources" in capsys.readouterr().err


def test_a_trl_reward_gets_conversations_as_message_lists(tiny_parts):
    from rlhf_core.ppo.reward_sources import with_dataset_columns
    seen = {}

    def reward(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions, **kwargs)
        return [0.0] * len(prompts)
    turns = [{"role": "user", "content": "hi"}]
    fn = with_dataset_columns(reward, {"<rendered>": {"answer": "x"}}, {"<rendered>": turns})
    fn(["<rendered>", "plain"], ["hello", "there"])
    assert seen["prompts"] == [turns, "plain"]
    assert seen["completions"] == [[{"role": "assistant", "content": "hello"}], "there"]
    assert seen["answer"] == ["x", None]
