"""Tests for rlhf_core/ppo/buffer.py and rlhf_core/ppo/experience.py."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_core.ppo.buffer import RolloutBuffer, accumulation_weights, micro_batches
from rlhf_core.ppo.experience import Experience
from rlhf_core.ppo.losses import policy_loss, value_loss


def make_experience(lengths, T, Tq=3, first_id=0, seed=0, dtype=torch.float64):
    """Rows tagged by query_ids[:, -1] = row id, so tests can track them through shuffles."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths])  # (B, T) bool
    query_ids = torch.zeros(B, Tq, dtype=torch.long)
    query_ids[:, -1] = torch.arange(first_id, first_id + B)
    rand = lambda: torch.randn(B, T, generator=g, dtype=dtype)  # noqa: E731
    return Experience(
        query_ids=query_ids,
        query_mask=torch.ones(B, Tq, dtype=torch.bool),
        response_ids=torch.randint(1, 50, (B, T), generator=g),
        mask=mask,
        logprobs=-rand().abs(),
        ref_logprobs=-rand().abs(),
        scores=torch.randn(B, generator=g, dtype=dtype),
        values=rand(),
        advantages=rand(),
        returns=rand(),
    )


def row_ids(exp):
    return exp.query_ids[:, -1].tolist()


# ---- Experience -------------------------------------------------------------------------------


def test_experience_index_len_to():
    exp = make_experience([3, 1, 4, 0], T=4)
    assert len(exp) == 4
    sub = exp.index(torch.tensor([2, 0]))
    assert row_ids(sub) == [2, 0] and len(sub) == 2
    torch.testing.assert_close(sub.values, exp.values[[2, 0]])
    assert sub.rewards is None
    assert row_ids(exp.index(slice(1, 3))) == [1, 2]
    moved = exp.to("cpu")
    assert moved is not exp and torch.equal(moved.mask, exp.mask)


def test_experience_rejects_mismatched_shapes():
    exp = make_experience([2, 2], T=2)
    with pytest.raises(ValueError, match="values"):
        Experience(**{**exp.__dict__, "values": torch.zeros(2, 3)})


def test_experience_cat_pads_prompts_left_and_responses_right():
    a = make_experience([2, 1], T=2, Tq=2, first_id=0)
    b = make_experience([4], T=4, Tq=3, first_id=2)
    c = Experience.cat([a, b])
    assert len(c) == 3 and c.mask.shape == (3, 4) and c.query_ids.shape == (3, 3)
    assert row_ids(c) == [0, 1, 2]
    assert c.query_mask[:2, 0].tolist() == [False, False]  # new prompt padding is on the left
    assert c.mask[0].tolist() == [True, True, False, False]  # response padding on the right
    torch.testing.assert_close(c.values[0, :2], a.values[0])
    assert (c.values[0, 2:] == 0).all()
    with pytest.raises(ValueError):
        Experience.cat([])


# ---- RolloutBuffer.minibatches ----------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    n_parts=st.integers(1, 3),
    per_part=st.sampled_from([2, 4, 6]),
    num_mb=st.sampled_from([1, 2]),
    seed=st.integers(0, 10**6),
)
def test_minibatches_cover_every_row_once(n_parts, per_part, num_mb, seed):
    buf = RolloutBuffer()
    for p in range(n_parts):
        buf.add(make_experience([1 + (i % 3) for i in range(per_part)], T=3 + p, first_id=p * per_part, seed=p))
    n = n_parts * per_part
    assert len(buf) == n
    seen = []
    mbs = list(buf.minibatches(num_mb, torch.Generator().manual_seed(seed)))
    assert len(mbs) == num_mb and all(len(mb) == n // num_mb for mb in mbs)
    for mb in mbs:
        seen += row_ids(mb)
    assert sorted(seen) == list(range(n))


def test_minibatches_reproducible_per_seed():
    buf = RolloutBuffer()
    buf.add(make_experience([2] * 16, T=2))

    def order(seed):
        g = torch.Generator().manual_seed(seed)
        return [[row_ids(mb) for mb in buf.minibatches(4, g)] for _epoch in range(2)]

    assert order(7) == order(7)
    assert order(7) != order(8)
    first, second = order(7)
    assert first != second  # each call (epoch) reshuffles


def test_minibatches_must_divide_and_clear():
    buf = RolloutBuffer()
    buf.add(make_experience([1, 2, 3], T=3))
    with pytest.raises(ValueError, match="3 rollouts into 2"):
        next(buf.minibatches(2, torch.Generator().manual_seed(0)))
    buf.clear()
    assert len(buf) == 0
    with pytest.raises(ValueError):
        next(buf.minibatches(1, torch.Generator()))


# ---- micro-batches and gradient accumulation --------------------------------------------------


def test_micro_batches_split_in_order():
    exp = make_experience([1] * 7, T=1)
    assert [row_ids(m) for m in micro_batches(exp, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [row_ids(m) for m in RolloutBuffer.micro_batches(exp, 4)] == [[0, 1, 2, 3], [4, 5, 6]]


def test_accumulation_weights_hand_worked():
    # valid tokens per row [3, 1, 0, 4] -> micro-batches of 2 rows hold 4 and 4 of 8 tokens
    mask = torch.tensor([[t < n for t in range(4)] for n in [3, 1, 0, 4]])
    assert accumulation_weights(mask, 2) == [0.5, 0.5]
    assert accumulation_weights(mask, 3) == [0.5, 0.5]
    assert accumulation_weights(mask, 2, "seq-mean-token-mean") == [2 / 3, 1 / 3]
    assert accumulation_weights(mask, 3, "seq-mean-token-sum-norm") == [3 / 4, 1 / 4]  # rows, empty ones too
    assert accumulation_weights(torch.zeros(2, 3), 1) == [0.0, 0.0]


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("micro_batch_size", [1, 3, 4])
def test_accumulated_gradient_equals_full_minibatch_gradient(aggregation, micro_batch_size):
    # A toy policy: logprobs = old_logprobs + features·w, w the parameters. Uneven masks,
    # including an empty row, and a micro size that does not divide the batch.
    lengths = [7, 1, 0, 5, 3, 7, 2, 6]
    exp = make_experience(lengths, T=7, seed=3)
    g = torch.Generator().manual_seed(5)
    feats = 0.3 * torch.randn(len(lengths), 7, 4, generator=g, dtype=torch.float64)  # (B, T, D)
    w = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)  # (D,)

    def loss_fn(e, f):
        logprobs = e.logprobs + f @ w  # (b, T)
        pg, _ = policy_loss(logprobs, e.logprobs, e.advantages, e.mask, 0.2, aggregation, max_length=10)
        vf, _ = value_loss(e.values + f @ w, e.values, e.returns, e.mask, 0.2, aggregation, max_length=10)
        return pg + 0.1 * vf

    full = loss_fn(exp, feats)
    (full_grad,) = torch.autograd.grad(full, w)

    weights = accumulation_weights(exp.mask, micro_batch_size, aggregation)
    total = 0.0
    for weight, micro, f in zip(weights, micro_batches(exp, micro_batch_size), feats.split(micro_batch_size)):
        loss = weight * loss_fn(micro, f)
        loss.backward()  # accumulates into w.grad, as the trainer does
        total += loss.item()
    assert total == pytest.approx(full.item(), abs=1e-12)
    torch.testing.assert_close(w.grad, full_grad, atol=1e-12, rtol=0)
