"""Phase 1: response-only labels, full / LoRA / QLoRA training, saved folders load in transformers."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhf_core.config import SFTConfig
from rlhf_core.errors import ConfigError
from rlhf_core.models import load_causal_lm
from rlhf_core.phases import sft
from rlhf_core.phases.sft import collate, encode_example
from rlhf_core.tracking import MetricsLogger

EOS, PAD = 1, 0


def test_labels_mask_exactly_prompt_and_padding():
    prompts = [[5, 6, 7], [8], [9, 10]]
    completions = [[11, 12], [13, 14, 15, 16], [17]]
    batch = collate([encode_example(p, c, EOS, max_length=64) for p, c in zip(prompts, completions)], PAD)
    width = max(len(p) + len(c) + 1 for p, c in zip(prompts, completions))
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c) + 1
        ids, labels, att = batch["input_ids"][i].tolist(), batch["labels"][i].tolist(), batch["attention_mask"][i].tolist()
        assert ids == p + c + [EOS] + [PAD] * (width - n)
        assert labels == [-100] * len(p) + c + [EOS] + [-100] * (width - n)
        assert att == [1] * n + [0] * (width - n)


def test_truncation_keeps_labels_aligned():
    ids, labels = encode_example([5, 6, 7], [11, 12, 13, 14], EOS, max_length=5)
    assert ids == [5, 6, 7, 11, 12] and labels == [-100, -100, -100, 11, 12]


def run_sft(pretrained, task, tmp_path, **kw):
    base, _, _ = pretrained
    cfg = SFTConfig(model=str(base), batch_size=8, learning_rate=3e-3, log_every=5, **kw)
    logger = MetricsLogger(None)
    out = tmp_path / f"sft-{cfg.mode}"
    return out, sft.run(cfg, out, logger, task=task), logger


def test_full_sft_lowers_response_loss(pretrained, task, tmp_path):
    out, summary, logger = run_sft(pretrained, task, tmp_path, max_steps=20)
    for key in ("eval_loss", "eval_loss_before", "train_loss", "wall_seconds"):
        assert key in summary
    assert summary["eval_loss"] < summary["eval_loss_before"] - 0.05
    assert logger.series("sft", "loss/eval")[1] == pytest.approx([summary["eval_loss_before"], summary["eval_loss"]])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.eos_token_id == 1 and (out / "tokenizer.json").is_file()


def test_lora_trains_only_adapters_and_merges_into_q_v(pretrained, task, tmp_path):
    base, _, _ = pretrained
    model = load_causal_lm(str(base), mode="lora")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}

    out, summary, _ = run_sft(pretrained, task, tmp_path, mode="lora", max_steps=8)
    assert summary["trainable_params"] == sum(model.get_parameter(n).numel() for n in trainable)
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()  # merged: a plain model, no lora keys
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    AutoModelForCausalLM.from_pretrained(out)


def test_lora_without_merge_saves_adapter_and_base_untouched(pretrained, task, tmp_path):
    base, _, _ = pretrained
    weights = load_file(str(base / "model.safetensors"))
    out, _, _ = run_sft(pretrained, task, tmp_path, mode="lora", max_steps=4, merge_adapter=False)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0
    reloaded = load_file(str(base / "model.safetensors"))
    assert all(torch.equal(weights[k], reloaded[k]) for k in weights)


def test_qlora_loads_nf4_double_quant_and_backprops(pretrained):
    import bitsandbytes as bnb
    base, _, _ = pretrained
    model = load_causal_lm(str(base), mode="qlora")
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 7  # q k v o gate up down of the one decoder layer
    for m in linears:
        assert m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested  # double quant
    ids = torch.randint(3, 300, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(float(g.abs().sum()) > 0 for g in grads.values())


def test_qlora_sft_saves_adapter_that_transformers_loads(pretrained, task, tmp_path):
    out, summary, _ = run_sft(pretrained, task, tmp_path, mode="qlora", max_steps=2)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert summary["train_loss"] == summary["train_loss"]  # finite, not NaN
    model = AutoModelForCausalLM.from_pretrained(out)  # base + adapter via transformers' PEFT integration
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_missing_base_model_is_one_line_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        sft.run(SFTConfig(model=str(tmp_path / "missing")), tmp_path / "out", MetricsLogger(None))
    assert "missing" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="sft.model"):
        sft.run(SFTConfig(), tmp_path / "out", MetricsLogger(None))


def test_messages_data_is_converted_with_the_chat_template(pretrained, tmp_path):
    base, _, _ = pretrained
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Review of The Silent River {i}:"},
                          {"role": "assistant", "content": "the acting was great."}]} for i in range(6)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = SFTConfig(model=str(base), data=str(data), max_steps=2, batch_size=4)
    summary = sft.run(cfg, tmp_path / "out", MetricsLogger(None))
    assert summary["steps"] == 2 and summary["eval_loss"] == summary["eval_loss"]


def test_missing_data_file_is_one_line_data_error(pretrained, tmp_path):
    from rlhf_core.errors import DataError
    base, _, _ = pretrained
    with pytest.raises(DataError) as err:
        sft.run(SFTConfig(model=str(base), data=str(tmp_path / "nope.jsonl")), tmp_path / "o", MetricsLogger(None))
    assert "nope.jsonl" in str(err.value) and "\n" not in str(err.value)
