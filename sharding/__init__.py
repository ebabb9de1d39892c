"""Meshes and shardings: turns a deployment's mesh description into a layout for every
array the co-serving step touches, and starts multi-host runs.

- ``MeshConfig`` / ``make_mesh``: ``data x model`` device meshes from flags or JSON.
- ``Layout``: partition specs (Megatron-style tensor parallelism, dependent
  parallelization of LoRA slots) and placement; ``Engine(model, config, mesh=...)``
  and ``load_model(path, mesh=...)`` use it.
- ``sharding.gather.tree_to_host``: host copies of (multi-host) device arrays.
- ``sharding.distributed``: ``jax.distributed`` start-up and the multi-host
  leader/follower protocol.
"""

from sharding.layout import Layout, shard_params
from sharding.mesh import AXES, DATA, MODEL, MeshConfig, abstract_mesh, make_mesh

__all__ = ["AXES", "DATA", "MODEL", "Layout", "MeshConfig", "abstract_mesh", "make_mesh",
           "shard_params"]
