"""The refresh policy: where the cut falls, what the cache and the recent window hold, staleness."""

import numpy as np
import pytest

from persrec.serve.policy import RefreshPolicy


def test_cut_moves_in_steps_of_refresh_every():
    policy = RefreshPolicy(history_length=8, recent_length=6, every=3)
    # n <= R: nothing cached; then cut = 3 * ceil((n - 6) / 3)
    assert [policy.cut(n) for n in range(1, 15)] == [0, 0, 0, 0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9]
    assert [policy.plan(n).staleness for n in range(5, 15)] == [0, 0, 0, 1, 2, 0, 1, 2, 0, 1]


def test_refresh_every_one_is_the_evaluators_window():
    policy = RefreshPolicy(history_length=8, recent_length=6, every=1)
    history = np.arange(1, 21)
    plan = policy.plan(20)
    window = np.concatenate([plan.history_part(history), plan.recent_part(history)])
    np.testing.assert_array_equal(window, history[-14:])
    assert plan.query_slot == 5 and plan.staleness == 0


def test_parts_of_a_short_and_a_stale_history():
    policy = RefreshPolicy(history_length=4, recent_length=3, every=2)
    short = policy.plan(2)  # right-aligned, like the evaluator's left-padded window
    np.testing.assert_array_equal(short.history_part(np.array([7, 8])), [0, 0, 0, 0])
    np.testing.assert_array_equal(short.recent_part(np.array([7, 8])), [0, 7, 8])
    assert short.query_slot == 2
    stale = policy.plan(6)  # the cut just moved to 4: the cache holds items 1..4, the recent window 5, 6
    history = np.arange(1, 7)
    np.testing.assert_array_equal(stale.history_part(history), [1, 2, 3, 4])
    np.testing.assert_array_equal(stale.recent_part(history), [5, 6, 0])
    assert stale.query_slot == 1 and stale.staleness == 0
    later = policy.plan(7)  # one event on, the same cut
    np.testing.assert_array_equal(later.recent_part(np.arange(1, 8)), [5, 6, 7])
    assert later.cut == 4 and later.query_slot == 2 and later.staleness == 1


def test_refresh_every_is_bounded_by_the_recent_window():
    with pytest.raises(ValueError, match=r"refresh_every must lie in \[1, 6\]"):
        RefreshPolicy(8, 6, every=7)
