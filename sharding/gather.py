"""Host copies of (possibly multi-host) device arrays."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def tree_to_host(tree: Any) -> Any:
    """A tree of device arrays as numpy. Arrays spread over other processes' devices
    (multi-host) are first replicated by one program, which every process must run
    together (``sharding.distributed`` makes followers do so)."""
    leaves = jax.tree.leaves(tree)
    if all(x.is_fully_addressable or x.is_fully_replicated for x in leaves):
        return jax.tree.map(np.asarray, tree)
    replicated = NamedSharding(leaves[0].sharding.mesh, PartitionSpec())
    return jax.tree.map(np.asarray, jax.jit(_identity, out_shardings=replicated)(tree))


def _identity(tree):
    # Module level, so repeated gathers of the same shapes reuse one compilation.
    return tree
