"""Phase 3's config: PPOConfig, with the KL penalty placements and loss aggregations it accepts.

Imported from ``rlhf_core.config`` as before (``from rlhf_core.config import PPOConfig``)."""
from __future__ import annotations

from dataclasses import dataclass

from .config_base import opt
from .config_common import LoraFields, PhaseCommon
from .errors import ConfigError

# Where each KL estimator's penalty may go (docs/kl.md has the gradient each pair gives):
# "reward": -beta*kl_t in token t's reward; "loss": beta*kl_t as a loss term, differentiated (GRPO's
# placement of k3); "both" (exact only): the next state's KL in the reward, this state's in the loss,
# the unbiased gradient of E[score] - beta*E[sum_t KL(pi(.|s_t) || pi_ref(.|s_t))].
# k1 in the loss is refused: E_π[∇(log π − log π_ref)] = E_π[∇log π] = 0 at θ = θ_old, so its expected KL
# gradient is exactly zero on the first step of every iteration (docs/kl.md).
KL_PENALTIES = {"k1": ("reward",), "k2": ("reward", "loss"), "k3": ("reward", "loss"),
                "exact": ("reward", "loss", "both")}
# How the PPO loss reduces its per-token terms (rlhf_core.ppo.losses.aggregate, the same tuple there).
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class PPOConfig(LoraFields, PhaseCommon):
    """Phase 3: PPO with a value head and a KL-penalized reward (defaults sized for the tiny preset).

    Shares PhaseCommon's fields; its defaults differ for batch_size, learning_rate, log_every and
    save_every (PPO logs and saves per iteration)."""
    _section = "ppo"
    policy: str = opt("", "SFT policy folder (default in the pipeline: phase 1's output)")
    reward: str = opt("", "reward: a reward-model folder, an HF classifier folder, 'gold', or 'file.py:function' "
                          "(TRL's contract fn(prompts, completions, **kwargs) gets the prompt records' other columns; "
                          "fn(prompts, responses) works too); several, comma-separated, are summed with reward_weights")
    reward_weights: list[float] = opt([], "weights of the comma-separated reward sources in reward (default 1 each); "
                                          "each source's mean is logged as objective/reward/NAME")
    prompts: str = opt("", "prompt data: JSONL/parquet with 'prompt' (default: embedded task)")
    eval_prompts: str = opt("", "held-out prompts to evaluate on ('prompt' records); default: the embedded task's, "
                                "or with your own --ppo.prompts a seeded held-out split of them (eval_fraction, "
                                "at least 16, never trained on; an error when it would leave fewer prompts to train "
                                "on than it holds out). Rules for an eval file: prompts longer than "
                                "max_prompt_length follow on_long_prompt; eval prompts that are also training "
                                "prompts, a file in another format than the training prompts (plain strings vs "
                                "conversations) and fewer training prompts than one iteration uses are warnings, "
                                "listed in summary.json (ppo.eval_warnings)")
    chat_template: str = opt("auto", "conversational prompts ({role, content} turns) are always rendered with the "
                                     "policy tokenizer's chat template; plain-string prompts: 'auto' and 'never' use "
                                     "them as they are, 'always' renders each as one user turn")
    eval_fraction: float = opt(0.05, "share of your own prompts held out for evaluation when eval_prompts is empty")
    gold: str = opt("", "a gold judge the reward source never sees, 'file.py:function' (same contract as a reward "
                        "function); default: the embedded task's judge, none for your own prompts (then no gold "
                        "numbers are reported)")
    num_iterations: int = opt(100, "rollout + update iterations")
    batch_size: int = opt(32, "prompts (episodes) per rollout")
    num_mini_batches: int = opt(2, "minibatches per PPO epoch (batch_size must divide evenly)")
    micro_batch_size: int = opt(0, "gradient-accumulation micro-batch (0: the whole minibatch)")
    ppo_epochs: int = opt(4, "passes over each rollout batch")
    response_length: int = opt(256, "max new tokens per response (TRL's GRPO default; the tiny preset's pipeline "
                                    "uses 24)")
    max_prompt_length: int = opt(512, "prompts longer than this (tokens) are truncated from the left, with a warning "
                                      "or an error (on_long_prompt); TRL's default; the tiny preset's pipeline uses 32")
    on_long_prompt: str = opt("truncate", "a prompt longer than max_prompt_length: 'truncate' "
                                          "(with a warning) or 'error'")
    temperature: float = opt(1.0, "sampling temperature (logprobs are computed at the same temperature)")
    top_k: int = opt(0, "top-k sampling: must stay 0 (off) for PPO rollouts, whose logprobs, ratio and KL are "
                        "those of the full softmax (docs/how_ppo_works.md, section 2)")
    top_p: float = opt(1.0, "nucleus sampling mass: must stay 1.0 (off) for PPO rollouts, as top_k")
    learning_rate: float = opt(1e-4, "peak AdamW learning rate")
    lr_schedule: str = opt("linear", "'constant', 'linear' decay or 'cosine'")
    adam_eps: float = opt(1e-5, "AdamW epsilon (CleanRL's PPO uses 1e-5; TRL 1e-8)")
    warmup_steps: int = opt(0, "optimizer steps of linear warm-up")
    kl_coef: float = opt(0.2, "initial KL penalty coefficient beta (TRL defaults to 0.05; 0.1 let seed 3 hack the tiny RM)")
    kl_estimator: str = opt("k1", "per-token KL of the penalty: 'k1', 'k2', 'k3' or 'exact' (full vocabulary, "
                                  "from the fused KL kernel)")
    kl_penalty: str = opt("reward", "where the KL penalty goes: 'reward' (-beta*kl_t in each token's reward), "
                                    "'loss' (beta*kl_t as a differentiated loss term) or 'both' (exact only: the "
                                    "next state's KL in the reward, this state's in the loss; docs/kl.md)")
    measure_kl: bool = opt(False, "at kl_coef 0 (no adaptive controller) still run the reference forward every "
                                  "rollout to log objective/kl*; off, it is skipped as TRL's GRPO does at beta 0 "
                                  "(eval/kl_to_ref is measured either way)")
    adaptive_kl: bool = opt(False, "adapt kl_coef toward kl_target (Ziegler et al. 2019)")
    kl_target: float = opt(1.0, "target sequence KL for the adaptive controller")
    kl_horizon: int = opt(10000, "adaptive controller horizon in episodes")
    clip_range: float = opt(0.2, "PPO ratio clip epsilon")
    policy_loss: str = opt("ppo", "the per-token policy loss: 'ppo' (clipped; asymmetric with clip_range_low/high: "
                                  "DAPO's clip-higher), 'dual_clip', 'gspo', 'cispo', 'sapo', another registered "
                                  "name, or 'file.py:function' (docs/losses.md)")
    clip_range_low: float = opt(0.0, "lower clip epsilon: ratios clipped at 1 - clip_range_low (0: clip_range); "
                                     "gspo's paper uses 3e-4, cispo's sets 1 (no lower bound)")
    clip_range_high: float = opt(0.0, "upper clip epsilon: ratios clipped at 1 + clip_range_high (0: clip_range); "
                                      "DAPO's clip-higher uses 0.28 with clip_range 0.2, gspo's paper 4e-4")
    dual_clip_c: float = opt(3.0, "dual_clip: the loss of a token with A < 0 is bounded by c*|A| (c > 1; "
                                  "Ye et al. 2020 use 3)")
    sapo_tau_pos: float = opt(1.0, "sapo: gate temperature for tokens with A > 0")
    sapo_tau_neg: float = opt(1.05, "sapo: gate temperature for tokens with A <= 0 (the paper: > sapo_tau_pos)")
    dynamic_sampling: bool = opt(False, "DAPO's dynamic sampling: drop groups whose scores are all equal (no "
                                        "learning signal) and refill the batch from further prompts (needs "
                                        "group_size >= 2)")
    dynamic_sampling_max_rounds: int = opt(4, "generation rounds per iteration at most when dynamic_sampling "
                                              "refills; still short after them, the batch is completed with "
                                              "dropped groups (logged as dynamic/refilled_with_flat)")
    overlong_buffer: int = opt(0, "DAPO's overlong reward shaping: a length penalty rising linearly from 0 to "
                                  "-overlong_penalty over the last N tokens of response_length (0: off)")
    overlong_penalty: float = opt(1.0, "the overlong shaping's largest penalty (at response_length)")
    overlong_filter: bool = opt(False, "DAPO's overlong filtering: responses cut at response_length without an "
                                       "EOS are kept out of the loss (they still count in group baselines)")
    clip_range_value: float = opt(0.2, "value clip epsilon around the old values")
    vf_coef: float = opt(0.1, "value loss weight")
    ent_coef: float = opt(0.0, "entropy bonus weight")
    gamma: float = opt(1.0, "discount factor")
    lam: float = opt(0.95, "GAE lambda")
    whiten_rewards: bool = opt(False, "whiten per-token rewards before GAE as TRL and the N+ reference do: "
                                      "(r - mean)/std + mean, which keeps the mean but adds mean*(1 - 1/std) to "
                                      "every valid token (a length bonus or penalty), not a pure rescaling")
    advantage_estimator: str = opt("gae", "'gae' (critic), 'rloo', 'grpo', 'dr_grpo' (group estimators: "
                                          "group_size >= 2), 'reinforce_pp' (critic-free), another registered "
                                          "name, or 'file.py:function' (docs/estimators.md)")
    whiten_advantages: str = opt("auto", "'auto' (what the estimator declares: gae and reinforce_pp whiten over "
                                         "the global batch, rloo/grpo/dr_grpo do not), 'true' or 'false'")
    loss_aggregation: str = opt("token-mean", "how the policy, value, entropy and KL loss terms reduce over tokens: "
                                              "'token-mean', 'seq-mean-token-mean' or 'seq-mean-token-sum-norm' "
                                              "(sum / (rows x response_length): Dr. GRPO's constant normalizer)")
    loss_fn: str = opt("", "'' (the clipped PPO loss, objective.ppo_loss) or 'file.py:function' with ppo_loss's "
                           "keywords; it may return a (B, T) per-token loss, which is aggregated for it")
    group_size: int = opt(1, "samples per prompt (rows of one prompt are contiguous; group estimators need >= 2)")
    target_kl: float = opt(0.0, "stop the PPO epochs of an iteration when approx KL exceeds this (0: off)")
    missing_eos_penalty: float = opt(0.0, "subtracted from the score of responses with no EOS (0: off)")
    value_model: str = opt("shared", "'shared' (head on the policy trunk) or 'separate' (own network)")
    value_init_from_reward: bool = opt(False, "initialize the separate value model from the reward model")
    use_lora: bool = opt(False, "train LoRA adapters; the reference is the adapter-disabled policy")
    kernel_backend: str = opt("auto", "fused logprob backend: 'auto', 'torch' or 'triton'")
    shard_reference: bool = opt(False, "with parallel='fsdp2': shard the reference model's trunk like the "
                                       "policy's instead of a full replica per rank")
    shard_reward_model: bool = opt(False, "with parallel='fsdp2' and a reward-model folder: shard the reward "
                                          "model (blocks, then the whole classifier) instead of a replica per rank")
    rollout_logprobs: bool = opt(True, "read the old logprobs (and shared-trunk values) from the sampling loop's "
                                       "hidden states instead of a second policy forward")
    rollout_engine: str = opt("torch", "what samples the rollouts: 'torch' (this engine's KV-cache loop) or 'vllm' "
                                       "(an in-process vLLM engine, pip install -e .[vllm]; docs/rollout.md)")
    vllm_compile: bool = opt(False, "rollout_engine vllm: torch.compile the engine's model (vLLM's default) instead "
                                    "of eager: SmolLM2 on CPU starts in ~80 s instead of ~4 s, then samples 1.1x faster")
    rollout_correction: str = opt("none", "correct for a sampling policy mu that is not the trainer's pi_old "
                                          "(docs/rollout.md): 'none', 'tis' (weight min(rho, C)), 'mis' (rho, 0 "
                                          "outside [1/C, C]), 'icepop' (rho, 0 outside [low, high]), another "
                                          "registered name or 'file.py:function'; rho = pi_old/mu, pi_old then "
                                          "from the trainer's own forward, mu from the sampling loop")
    rollout_correction_level: str = opt("token", "the correction's ratio per 'token' or per 'sequence' (the "
                                                 "product over the response)")
    rollout_correction_threshold: float = opt(2.0, "C of tis and mis (> 1)")
    rollout_correction_low: float = opt(0.5, "icepop's lower bound (IcePop's alpha, in (0, 1))")
    rollout_correction_high: float = opt(5.0, "icepop's upper bound (IcePop's beta, > 1)")
    fast_activations: bool = opt(True, "swap GPT-2's five-op tanh GELU for torch's one-kernel "
                                       "F.gelu(approximate='tanh'): the same function, other float rounding")
    eval_every: int = opt(20, "measure the gold reward on held-out prompts every N iterations (0: end only)")
    log_every: int = opt(1, "log metrics every N iterations")
    save_every: int = opt(10, "write a resumable checkpoint every N iterations (and at the end; 0: end only)")
    trace: bool = opt(False, "dump every tensor of the first iteration to trace.json (docs/how_ppo_works.md)")
    num_threads: int = opt(0, "torch CPU threads (0: auto = 1 for models narrower than 256, where thread sync "
                              "costs more than the math, else every core)")

    def validate(self, world_size: int = 1) -> None:
        """Check every field; with ``world_size`` ranks (torchrun) also that the batch splits into
        whole groups per rank and into num_mini_batches on each."""
        super().validate()
        self.validate_lora()
        for k in ("num_iterations", "num_mini_batches", "ppo_epochs", "response_length",
                  "max_prompt_length", "group_size"):
            self.check(getattr(self, k) > 0, k, "a positive integer")
        self.check(self.batch_size % self.num_mini_batches == 0, "batch_size",
                   f"divisible by num_mini_batches={self.num_mini_batches}")
        mb = self.batch_size // self.num_mini_batches
        self.check(self.micro_batch_size >= 0 and (self.micro_batch_size == 0 or mb % self.micro_batch_size == 0),
                   "micro_batch_size", f"0 or a divisor of the minibatch size {mb}")
        self.check(self.batch_size % self.group_size == 0, "batch_size", f"divisible by group_size={self.group_size}")
        self.check(self.temperature > 0, "temperature", "a positive number")
        # Truncated sampling draws from another distribution than the softmax every logprob, ratio and KL
        # is computed under: the importance ratio and the KL would not be the sampling policy's.
        self.check(self.top_k == 0, "top_k", "0: PPO rollouts sample the full softmax (top-k would make the "
                                             "ratio and the KL not those of the sampling policy)")
        self.check(self.top_p == 1.0, "top_p", "1.0: PPO rollouts sample the full softmax (nucleus sampling would "
                                               "make the ratio and the KL not those of the sampling policy)")
        self.check(self.lr_schedule in ("constant", "linear", "cosine"), "lr_schedule", "constant, linear or cosine")
        self.check(self.kl_coef >= 0, "kl_coef", "a number >= 0")
        self.check(self.kl_estimator in KL_PENALTIES, "kl_estimator", "k1, k2, k3 or exact")
        if self.kl_estimator == "k1" and self.kl_penalty == "loss":
            raise ConfigError("ppo.kl_penalty='loss' with ppo.kl_estimator='k1': its expected KL gradient is exactly 0 "
                              "at theta = theta_old (E[grad log pi] = 0), so it trains no KL; use kl_penalty 'reward' "
                              "(k1 there is unbiased) or kl_estimator k2, k3 or exact (docs/kl.md)")
        if self.kl_penalty not in KL_PENALTIES[self.kl_estimator]:
            raise ConfigError(f"ppo.kl_penalty={self.kl_penalty!r} with ppo.kl_estimator={self.kl_estimator!r}: "
                              f"expected one of {', '.join(KL_PENALTIES[self.kl_estimator])} ('both' needs 'exact'; "
                              "docs/kl.md)")
        self.check(self.kl_target > 0, "kl_target", "a positive number")
        self.check(self.kl_horizon > 0, "kl_horizon", "a positive integer")
        self.check(self.clip_range > 0, "clip_range", "a positive number")
        self.check(0 <= self.clip_range_low <= 1, "clip_range_low", "a number in [0, 1] (0: clip_range; 1: no "
                                                                     "lower bound, the ratio stays >= 0)")
        self.check(self.clip_range_high >= 0, "clip_range_high", "a number >= 0 (0: clip_range)")
        low, high = self.clip_range_low or self.clip_range, self.clip_range_high or self.clip_range
        if high < low and self.policy_loss != "cispo":  # cispo's paper: no lower bound (1), a tuned upper one
            raise ConfigError(f"ppo.clip_range_high={high:g} < ppo.clip_range_low={low:g}: the trust region's upper "
                              "clip must be at least its lower one (DAPO's clip-higher raises the upper one; only "
                              "cispo, whose paper sets no lower bound, takes clip_range_low 1 with a smaller high)")
        self.check(self.dual_clip_c > 1, "dual_clip_c", "a number > 1")
        self.check(self.sapo_tau_pos > 0, "sapo_tau_pos", "a positive number")
        self.check(self.sapo_tau_neg > 0, "sapo_tau_neg", "a positive number")
        self.check(bool(self.policy_loss), "policy_loss", "a registered name or 'file.py:function'")
        self.check(not self.dynamic_sampling or self.group_size >= 2, "dynamic_sampling",
                   f"false unless group_size >= 2 (it drops groups whose scores are all equal; group_size="
                   f"{self.group_size})")
        self.check(self.dynamic_sampling_max_rounds >= 1, "dynamic_sampling_max_rounds", "a positive integer")
        self.check(0 <= self.overlong_buffer < self.response_length, "overlong_buffer",
                   f"an integer in [0, response_length={self.response_length})")
        self.check(self.overlong_penalty >= 0, "overlong_penalty", "a number >= 0")
        sources = [part for part in self.reward.split(",") if part.strip()]
        if self.reward_weights and sources and len(self.reward_weights) != len(sources):
            raise ConfigError(f"ppo.reward_weights: {len(self.reward_weights)} weights for {len(sources)} reward "
                              "sources in ppo.reward")
        self.check(self.clip_range_value > 0, "clip_range_value", "a positive number")
        self.check(self.vf_coef >= 0, "vf_coef", "a number >= 0")
        self.check(0 <= self.gamma <= 1, "gamma", "a number in [0, 1]")
        self.check(0 <= self.lam <= 1, "lam", "a number in [0, 1]")
        self.check(self.value_model in ("shared", "separate"), "value_model", "shared or separate")
        self.check(self.kernel_backend in ("auto", "torch", "triton"), "kernel_backend", "auto, torch or triton")
        self.check(not self.shard_reference or self.parallel == "fsdp2", "shard_reference",
                   "false unless parallel='fsdp2'")
        self.check(not self.shard_reward_model or self.parallel == "fsdp2", "shard_reward_model",
                   "false unless parallel='fsdp2'")
        self.check(self.parallel == "ddp" or (self.value_model == "shared" and not self.use_lora), "parallel",
                   "'ddp' with value_model='separate' or use_lora (fsdp2 shards a full policy with a shared "
                   "value head)")
        self.check(self.rollout_engine in ("torch", "vllm"), "rollout_engine", "'torch' or 'vllm'")
        self.check(bool(self.rollout_correction), "rollout_correction", "'none', a name or 'file.py:function'")
        self.check(self.rollout_correction_level in ("token", "sequence"), "rollout_correction_level",
                   "token or sequence")
        self.check(self.rollout_correction_threshold > 1, "rollout_correction_threshold", "a number > 1 (C)")
        if self.rollout_correction_low > self.rollout_correction_high:
            raise ConfigError(f"ppo.rollout_correction_low={self.rollout_correction_low:g} > "
                              f"ppo.rollout_correction_high={self.rollout_correction_high:g}: icepop keeps the "
                              "ratios in [low, high]")
        self.check(0 < self.rollout_correction_low < 1, "rollout_correction_low", "a number in (0, 1)")
        self.check(self.rollout_correction_high > 1, "rollout_correction_high", "a number > 1")
        self.check(self.num_threads >= 0, "num_threads", "an integer >= 0")
        self.check(0 < self.eval_fraction < 1, "eval_fraction", "a fraction in (0, 1)")
        self.check(self.chat_template in ("auto", "always", "never"), "chat_template", "auto, always or never")
        self.check(not self.gold or self.gold.rpartition(":")[0].endswith(".py"), "gold", "'' or 'file.py:function'")
        self.check(self.on_long_prompt in ("truncate", "error"), "on_long_prompt", "truncate or error")
        self.check(self.whiten_advantages in ("auto", "true", "false"), "whiten_advantages", "auto, true or false")
        self.check(self.loss_aggregation in LOSS_AGGREGATIONS, "loss_aggregation", ", ".join(LOSS_AGGREGATIONS))
        self.check(bool(self.advantage_estimator), "advantage_estimator", "a registered name or 'file.py:function'")
        per_rank = self.batch_size // world_size
        self.check(self.batch_size % (world_size * self.group_size) == 0 and per_rank % self.num_mini_batches == 0,
                   "batch_size", f"a split into {world_size} ranks of whole groups (group_size={self.group_size}) "
                                 f"and num_mini_batches={self.num_mini_batches}")
