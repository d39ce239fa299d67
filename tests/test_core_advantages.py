"""ddpo.core.advantages on a sequence of epochs worked out by hand."""

import json
import math

import pytest
import torch

from ddpo.core import PerPromptStatTracker, global_normalize

SQRT_8_3 = math.sqrt(8 / 3)  # population std of (1, 3, 5)


def test_stat_tracker_hand_computed_sequence() -> None:
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)

    # Epoch 1: "a" holds (1, 3), "b" holds (5): both below min_count, so both use the batch (1, 3, 5):
    # mean 3, std sqrt(8/3).
    advantages = tracker.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 5.0]))
    torch.testing.assert_close(advantages, torch.tensor([-2 / SQRT_8_3, 0.0, 2 / SQRT_8_3]))

    # Epoch 2: "a" holds (1, 3, 5): its own mean 3, std sqrt(8/3). "b" holds (5, 7): still the batch (5, 7),
    # mean 6, std 1.
    advantages = tracker.update(["a", "b"], torch.tensor([5.0, 7.0]))
    torch.testing.assert_close(advantages, torch.tensor([2 / SQRT_8_3, 1.0]))

    # Epoch 3: "a" gets 7 and 9 before its statistics are taken; the buffer of 4 evicts the 1 -> (3, 5, 7, 9):
    # mean 6, std sqrt(5).
    advantages = tracker.update(["a", "a"], torch.tensor([7.0, 9.0]))
    torch.testing.assert_close(advantages, torch.tensor([1 / math.sqrt(5), 3 / math.sqrt(5)]))
    assert tracker.stats() == {"num_prompts": 2, "mean_buffer_length": 3.0}


def test_stat_tracker_interleaved_prompts_keep_sample_order() -> None:
    tracker = PerPromptStatTracker(buffer_size=8, min_count=1)
    advantages = tracker.update(["a", "b", "a", "b"], torch.tensor([0.0, 10.0, 2.0, 30.0]))
    # "a": mean 1, std 1; "b": mean 20, std 10
    torch.testing.assert_close(advantages, torch.tensor([-1.0, -1.0, 1.0, 1.0]), atol=1e-5, rtol=0)


def test_stat_tracker_with_global_std_centres_per_prompt_but_scales_by_the_batch() -> None:
    tracker = PerPromptStatTracker(buffer_size=8, min_count=1, global_std=True)
    # "a" is all-but-flat (0.70, 0.72: own std 0.01), "b" is bimodal (0, 1). Batch std of (0.70, 0.72, 0, 1)
    # is sqrt(mean of squares - square of mean) = 0.368...; "a" keeps small advantages instead of +-1.
    rewards = torch.tensor([0.70, 0.72, 0.0, 1.0], dtype=torch.float64)
    batch_std = rewards.std(unbiased=False)
    advantages = tracker.update(["a", "a", "b", "b"], rewards)
    expected = torch.stack([-0.01 / batch_std, 0.01 / batch_std, -0.5 / batch_std, 0.5 / batch_std])
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=0)  # the tracker adds 1e-6 to the std
    assert advantages[:2].abs().max() < 0.03 and advantages[2:].abs().min() > 1.3
    # Without it, each prompt's own std makes both +-1.
    plain = PerPromptStatTracker(buffer_size=8, min_count=1).update(["a", "a", "b", "b"], rewards)
    torch.testing.assert_close(plain, torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64), atol=1e-4, rtol=0)


def test_stat_tracker_state_dict_round_trip_continues_identically() -> None:
    history = [(["a", "b", "a"], torch.tensor([0.3, 0.7, 0.1])), (["b", "c"], torch.tensor([0.9, 0.2]))]
    next_prompts, next_rewards = ["a", "b", "c", "c"], torch.tensor([0.5, 0.4, 0.8, 0.6])
    original = PerPromptStatTracker(buffer_size=3, min_count=2)
    for prompts, rewards in history:
        original.update(prompts, rewards)

    restored = PerPromptStatTracker(buffer_size=3, min_count=2)
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))

    assert restored.stats() == original.stats()
    assert torch.equal(restored.update(next_prompts, next_rewards), original.update(next_prompts, next_rewards))


def test_stat_tracker_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 prompts for 3 rewards"):
        PerPromptStatTracker(buffer_size=4, min_count=1).update(["a", "b"], torch.zeros(3))


def test_global_normalize() -> None:
    advantages = global_normalize(torch.tensor([1.0, 3.0, 5.0]))
    torch.testing.assert_close(advantages, torch.tensor([-2 / SQRT_8_3, 0.0, 2 / SQRT_8_3]))
