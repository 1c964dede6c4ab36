"""Presets are data: what each one means, and its values under the user's."""
from rlhf_core.presets import get_preset


def test_preset_values_sit_under_the_users():
    merged = get_preset("smollm2").defaults({"ppo": {"num_iterations": 3}, "seed": 1})
    assert merged["ppo"]["num_iterations"] == 3 and merged["ppo"]["use_lora"] is True and merged["seed"] == 1


def test_pipeline_values_apply_to_the_pipeline_only():
    from rlhf_core.cli import build_parser, resolve_config
    ppo = {argv[0]: resolve_config(build_parser().parse_args(argv)).ppo for argv in (
        ["pipeline", "--output-dir", "x"], ["ppo", "--output-dir", "x"])}
    assert (ppo["pipeline"].value_model, ppo["pipeline"].value_init_from_reward) == ("separate", True)
    assert (ppo["ppo"].value_model, ppo["ppo"].value_init_from_reward) == ("shared", False)  # e.g. --reward gold
    mine = get_preset("tiny").defaults({"ppo": {"value_model": "shared"}}, pipeline=True)
    assert mine["ppo"]["value_model"] == "shared" and mine["ppo"]["value_init_from_reward"] is True
