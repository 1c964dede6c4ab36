"""Presets are data: what each one means, and its values under the user's."""
from rlhf_core.presets import get_preset


def test_preset_values_sit_under_the_users():
    merged = get_preset("smollm2").defaults({"ppo": {"num_iterations": 3}, "seed": 1})
    assert merged["ppo"]["num_iterations"] == 3 and merged["ppo"]["use_lora"] is True and merged["seed"] == 1
