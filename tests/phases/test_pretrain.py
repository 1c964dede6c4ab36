"""Phase 0: group_texts blocks, perplexity before/after, the saved folder loads in plain transformers."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_core.config import PretrainConfig
from rlhf_core.errors import ConfigError
from rlhf_core.phases import pretrain
from rlhf_core.phases.pretrain import group_texts
from rlhf_core.tracking import MetricsLogger


def naive_group(docs, block, eos):
    stream = []
    for d in docs:
        for t in d:
            stream.append(t)
        if eos is not None:
            stream.append(eos)
    blocks, i = [], 0
    while i + block <= len(stream):
        blocks.append(stream[i:i + block])
        i += block
    return blocks


@pytest.mark.parametrize("block,eos", [(1, None), (3, 99), (4, 99), (7, None), (50, 99)])
def test_group_texts_matches_naive_loop(block, eos):
    g = torch.Generator().manual_seed(block)
    docs = [torch.randint(0, 50, (int(n),), generator=g).tolist() for n in torch.randint(0, 9, (11,), generator=g)]
    out = group_texts(docs, block, eos)
    expected = naive_group(docs, block, eos)
    assert out.shape == (len(expected), block)
    assert out.tolist() == expected
    total = sum(len(d) for d in docs) + (len(docs) if eos is not None else 0)
    assert out.numel() == total - total % block  # only the remainder is dropped


def test_pretrain_lowers_perplexity_and_saves_loadable_folder(pretrained, task):
    out, summary, logger = pretrained
    for key in ("eval_perplexity_before", "eval_perplexity", "train_loss", "wall_seconds", "tokens"):
        assert key in summary
    # untrained ≈ uniform over the vocabulary; 40 steps must cut it by far more than noise
    assert summary["eval_perplexity_before"] > 150
    assert summary["eval_perplexity"] < summary["eval_perplexity_before"] / 4
    assert summary["tokens"] == 40 * 16 * 32
    steps, losses = logger.series("pretrain", "loss/train")
    assert steps[-1] == 40 and losses[-1] < losses[0]
    assert logger.series("pretrain", "eval/perplexity")[1][0] == pytest.approx(summary["eval_perplexity_before"])

    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id != tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    ids = tok(task.corpus[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert math.exp(float(loss)) < summary["eval_perplexity_before"] / 2


def test_missing_model_folder_is_one_line_error(tmp_path):
    cfg = PretrainConfig(model=str(tmp_path / "nope"), max_steps=1)
    with pytest.raises(ConfigError) as err:
        pretrain.run(cfg, tmp_path / "out", MetricsLogger(None))
    assert "nope" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_block_larger_than_model_context_is_config_error(task, tiny, tmp_path):
    cfg = PretrainConfig(block_size=tiny.max_position_embeddings + 1, max_steps=1)
    with pytest.raises(ConfigError, match="block_size"):
        pretrain.run(cfg, tmp_path / "out", MetricsLogger(None), model_cfg=tiny, task=task)
