"""Non-finite losses/gradients: the step is skipped with weights, optimizer and schedule untouched;
K in a row stop the run with one clear error and the last good checkpoint intact."""
import pytest
import torch

from rlhf_core.checkpoint import latest_checkpoint, load_checkpoint
from rlhf_core.errors import NumericError
from rlhf_core.ppo.trainer import ppo_loss


class NaNAfter:
    """The default loss, NaN from the ``start``-th call on (loss or, with ``grad``, only its gradient)."""

    def __init__(self, start: int, grad: bool = False):
        self.calls, self.start, self.grad = 0, start, grad

    def __call__(self, **kw):
        loss, stats = ppo_loss(**kw)
        self.calls += 1
        if self.calls < self.start:
            return loss, stats
        if self.grad:  # finite loss, NaN gradient (d/dx sqrt(x) at 0)
            return loss + torch.sqrt(kw["logprobs"].sum() * 0.0), stats
        return loss * float("nan"), stats


def optimizer_snapshot(trainer):
    state = trainer.optimizer.state_dict()
    return {pid: {k: v.clone() for k, v in s.items()} for pid, s in state["state"].items()}


@pytest.mark.parametrize("grad", [False, True])
def test_skipped_step_leaves_weights_optimizer_and_schedule_untouched(make_trainer, grad):
    trainer = make_trainer(loss_fn=NaNAfter(start=3, grad=grad), max_skipped_steps=10)
    trainer.step()  # two good optimizer steps: Adam moments exist
    weights = {n: p.clone() for n, p in trainer.policy.named_trainable_parameters().items()}
    moments, lr_step = optimizer_snapshot(trainer), trainer.scheduler.last_epoch
    metrics = trainer.step()  # two NaN steps
    assert metrics["perf/skipped_steps"] == 2 and trainer.skipped_in_row == 2
    assert all(torch.equal(p, weights[n]) for n, p in trainer.policy.named_trainable_parameters().items())
    after = optimizer_snapshot(trainer)
    assert after.keys() == moments.keys()
    assert all(torch.equal(after[i][k], moments[i][k]) for i in moments for k in moments[i])
    assert trainer.scheduler.last_epoch == lr_step
    assert all(p.grad is None for p in trainer.params)


def test_k_skipped_in_a_row_stop_with_last_checkpoint_intact(make_trainer, tmp_path):
    # iterations 1-2 are good (2 optimizer steps each), then only NaN: the 3rd in a row (iteration 4) stops
    trainer = make_trainer(loss_fn=NaNAfter(start=5), num_iterations=5, max_skipped_steps=3)
    with pytest.raises(NumericError, match=r"ppo iteration 4: 3 optimizer steps in a row") as err:
        trainer.train(tmp_path)
    assert "\n" not in str(err.value)
    last = latest_checkpoint(tmp_path)
    assert last.name == "step-000003"
    tensors, meta = load_checkpoint(last)
    assert meta["ppo"]["skipped_in_row"] == 2 and meta["ppo"]["skipped_steps"] == 2


def test_a_good_step_resets_the_count(make_trainer):
    flaky = NaNAfter(start=10 ** 9)

    def sometimes_nan(**kw):
        loss, stats = flaky(**kw)
        return (loss * float("nan") if flaky.calls % 2 else loss), stats

    trainer = make_trainer(loss_fn=sometimes_nan, num_iterations=4, max_skipped_steps=2)
    trainer.train()
    assert trainer.skipped_steps == 4 and trainer.iteration == 4


def linear_loop(tmp_path, bad_steps, max_skipped_steps=3, max_steps=6):
    """The supervised loop (SFT/RM/pretrain) on a linear model; ``bad_steps`` get a NaN loss."""
    from rlhf_core.config import TrainCommon
    from rlhf_core.phases.common import train_loop
    from rlhf_core.tracking import MetricsLogger
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    calls = []

    def loss_fn(idx):
        calls.append(idx)
        loss = model(data[idx]).pow(2).mean()
        return (loss * float("nan") if len(calls) in bad_steps else loss), len(idx)

    cfg = TrainCommon(batch_size=4, epochs=10, max_steps=max_steps, save_every=1, max_skipped_steps=max_skipped_steps,
                      warmup_ratio=0.0, log_every=1)
    logger = MetricsLogger(None)
    result = train_loop(model, loss_fn, 16, cfg, logger, "sft", torch.Generator().manual_seed(2), tmp_path)
    return model, logger, result


def test_supervised_loop_skips_and_counts(tmp_path):
    model, logger, result = linear_loop(tmp_path, bad_steps={2, 4})
    assert result.steps == 6 and [r["perf/skipped_steps"] for r in logger.records] == [0, 1, 1, 2, 2, 2]
    _, meta = load_checkpoint(latest_checkpoint(tmp_path))
    assert meta["scheduler"]["last_epoch"] == 4  # skipped steps do not advance the schedule


def test_supervised_loop_stops_after_k_in_a_row(tmp_path):
    with pytest.raises(NumericError, match=r"sft step 5: 3 optimizer steps in a row"):
        linear_loop(tmp_path, bad_steps={3, 4, 5})
    tensors, meta = load_checkpoint(latest_checkpoint(tmp_path))
    assert latest_checkpoint(tmp_path).name == "step-000004" and meta["loop"]["in_row"] == 2
