"""``bench/bucket_costs.py`` without an engine: which bucket is the cheapest holding another."""

from __future__ import annotations

import os
import sys

import pytest

from coserve_jax.batch import Bucket

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
bucket_costs = pytest.importorskip("bucket_costs")


def test_the_cheapest_bucket_holding_another_may_be_larger_and_the_table_says_so():
    seconds = {Bucket(16, 4, 8): 0.004, Bucket(16, 8, 8): 0.006, Bucket(16, 16, 8): 0.005,
               Bucket(16, 4, 32): 0.008, Bucket(16, 8, 32): 0.014, Bucket(16, 16, 32): 0.009}
    assert bucket_costs.cheapest_holding(Bucket(16, 8, 8), seconds) == Bucket(16, 16, 8)
    assert bucket_costs.cheapest_holding(Bucket(16, 4, 8), seconds) == Bucket(16, 4, 8)
    assert bucket_costs.cheapest_holding(Bucket(16, 8, 32), seconds) == Bucket(16, 16, 32)
    lines = bucket_costs.table(seconds).splitlines()
    assert lines[2:5] == ["| 4 | 8 | 4.00 | itself | 1.00 |",
                          "| 8 | 8 | 6.00 | 16 rows, 8 pages | 0.83 |",
                          "| 16 | 8 | 5.00 | itself | 1.00 |"]
    assert lines[6] == "| 8 | 32 | 14.00 | 16 rows, 32 pages | 0.64 |"
