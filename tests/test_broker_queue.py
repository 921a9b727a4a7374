"""The broker's run queue: priority first, clients in turn, FIFO within a client."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from zmqexec.broker.queue import RunQueue


def test_higher_priority_first_then_clients_in_turn_then_fifo():
    q: RunQueue[str] = RunQueue()
    for item in ("a1", "a2", "a3"):
        q.push(0, b"a", item)
    for item in ("b1", "b2"):
        q.push(0, b"b", item)
    q.push(5, b"b", "urgent")
    q.push(0, b"a", "retry", front=True)
    assert q.pop_many(100, lambda item: True) == ["urgent", "retry", "b1", "a1", "b2",
                                                  "a2", "a3"]
    assert len(q) == 0 and q.pop(lambda item: True) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from([b"a", b"b", b"c"]),
                          st.booleans(), st.booleans()), max_size=60),
       st.lists(st.integers(1, 8), min_size=1, max_size=20), st.integers(0, 2**32))
def test_taking_many_gives_what_taking_one_at_a_time_gives(pushes, takes, seed):
    """``pop_many`` (a whole run of one client's line) keeps the order and the
    round-robin of ``pop``, and skips stale items the same way."""
    stale = {i for i, (_, _, _, dead) in enumerate(pushes) if dead}
    one, many = RunQueue(), RunQueue()
    for i, (priority, client, front, _) in enumerate(pushes):
        one.push(priority, client, i, front)
        many.push(priority, client, i, front)
    valid = lambda item: item not in stale  # noqa: E731
    rng = random.Random(seed)
    for count in takes + [len(pushes) + 1]:
        if rng.random() < 0.3:  # pushes between takes, as submits arrive during dispatch
            item = len(pushes) + rng.randrange(10**6)
            for q in (one, many):
                q.push(0, b"a", item)
        expected = []
        for _ in range(count):
            item = one.pop(valid)
            if item is None:
                break
            expected.append(item)
        assert many.pop_many(count, valid) == expected
    assert len(one) == len(many) == 0
