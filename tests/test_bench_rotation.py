# SPDX-License-Identifier: Apache-2.0
"""The cold-L2 rotation of bench_sparse_verify (how many cache copies and input sets timed calls
cycle through) and bench.common.rotating, checked without a GPU."""

import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_sparse_verify import MAX_SETS, POOL_LIMIT_BYTES, cache_copies, input_sets
from bench.common import L2_ROTATE_BYTES, rotating

MB = 1 << 20


def test_warm_l2_is_one_copy_and_one_set():
    assert cache_copies(8 * MB, 0) == 1
    assert input_sets(MB, 1, 0) == 1


@given(
    copy_bytes=st.integers(MB, 64 << 30),
    set_fraction=st.floats(1e-4, 1.0),
    rotate_bytes=st.sampled_from([L2_ROTATE_BYTES, 64 * MB, 1 << 30]),
)
def test_a_rotation_spans_the_requested_bytes_unless_a_cap_binds(
    copy_bytes, set_fraction, rotate_bytes
):
    set_bytes = max(1, int(copy_bytes * set_fraction))  # a call reads part of one copy
    copies = cache_copies(copy_bytes, rotate_bytes)
    sets = input_sets(set_bytes, copies, rotate_bytes)
    assert copies >= 1 and sets >= copies  # every copy is read by some set
    assert copies == 1 or copies * copy_bytes <= POOL_LIMIT_BYTES
    assert sets <= MAX_SETS
    spanned = min(sets * set_bytes, copies * copy_bytes)  # what the calls of one rotation read
    pool_binds = copies * copy_bytes < rotate_bytes and (copies + 1) * copy_bytes > POOL_LIMIT_BYTES
    assert spanned >= rotate_bytes or pool_binds or sets == MAX_SETS


def test_rotating_calls_each_function_in_turn():
    calls = []
    fn = rotating([lambda i=i: calls.append(i) for i in range(3)])
    for _ in range(7):
        fn()
    assert calls == [0, 1, 2, 0, 1, 2, 0]
