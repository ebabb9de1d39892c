"""Deployment mesh descriptions and the ``jax.sharding.Mesh`` they become.

A deployment names two mesh axes: ``data`` (replicas of the weights; the token
batch is split across them) and ``model`` (tensor parallelism: heads and MLP
columns/rows split Megatron-style). ``model`` is the inner, fastest-varying
axis, so with jax's process-major device order the devices of one host form a
model group whenever ``model`` is at most the devices per host: tensor-parallel
all-reduces stay on NVLink/ICI inside a host and only the (rare) data-parallel
traffic crosses hosts.

The mesh is built with ``AxisType.Auto`` on every axis: the step is written as
plain jnp code plus in/out shardings, and GSPMD propagates the layout through
it. (``jax.make_mesh`` defaults to Explicit axes in recent jax, which would turn
every sharding mismatch into a type error inside the model code.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The shape of a deployment's device mesh: ``data x model`` devices."""

    data: int = 1
    """Data-parallel replicas (the token batch is split across them)."""
    model: int = 1
    """Tensor-parallel degree (heads, MLP columns/rows and vocabulary split across it)."""
    device_order: tuple[int, ...] | None = None
    """Device ids in mesh order (row-major over ``data x model``); None lets jax choose
    a topology-aware order (``jax.make_mesh``)."""

    def __post_init__(self):
        for name in ("data", "model"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MeshConfig.{name} must be a positive integer, got {value!r}")
        if self.device_order is not None:
            order = tuple(int(i) for i in self.device_order)
            if len(order) != self.size or len(set(order)) != len(order):
                raise ValueError(f"MeshConfig.device_order must list {self.size} distinct "
                                 f"device ids, got {list(order)}")
            object.__setattr__(self, "device_order", order)

    @property
    def size(self) -> int:
        """Devices the mesh needs."""
        return self.data * self.model

    @property
    def shape(self) -> dict[str, int]:
        return {DATA: self.data, MODEL: self.model}

    def describe(self) -> str:
        """``data=2,model=4`` (the form ``parse`` reads back)."""
        return f"{DATA}={self.data},{MODEL}={self.model}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MeshConfig:
        """From ``{"data": 2, "model": 4, "device_order": [...]}`` (missing axes are 1)."""
        unknown = set(d) - {DATA, MODEL, "device_order"}
        if unknown:
            raise ValueError(f"unknown mesh config field(s) {sorted(unknown)}; expected "
                             f"{DATA}, {MODEL}, device_order")
        order = d.get("device_order")
        return cls(data=d.get(DATA, 1), model=d.get(MODEL, 1),
                   device_order=None if order is None else tuple(order))

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """``"model=8"``, ``"data=2,model=4"`` or ``"data=2 model=4"``; or a path to a JSON file
        (``configs/mesh_model8.json``)."""
        text = text.strip()
        if text.endswith(".json") or os.path.isfile(text):
            return cls.load(text)
        fields: dict[str, int] = {}
        for part in filter(None, re.split(r"[,\s]+", text)):
            name, sep, value = part.partition("=")
            if not sep or name not in AXES or not value.isdigit():
                raise ValueError(f"bad mesh spec {text!r}: expected axis=size pairs such as "
                                 "'model=8' or 'data=2,model=4'")
            if name in fields:
                raise ValueError(f"bad mesh spec {text!r}: axis {name!r} given twice")
            fields[name] = int(value)
        if not fields:
            raise ValueError("empty mesh spec")
        return cls.from_dict(fields)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MeshConfig:
        """Reads a JSON mesh config (``configs/mesh_*.json``)."""
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a mesh config is a JSON object")
        return cls.from_dict(d)


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    """The ``Mesh`` of a config over ``devices`` (default ``jax.devices()``), axes
    ``("data", "model")``, both ``AxisType.Auto``.

    With ``device_order`` the devices are taken by id in that order; otherwise the
    first ``config.size`` devices are arranged by ``jax.make_mesh`` (which knows TPU
    and GPU topologies).
    """
    devices = list(jax.devices() if devices is None else devices)
    if config.size > len(devices):
        raise ValueError(f"mesh {config.describe()} needs {config.size} devices; "
                         f"{len(devices)} are available")
    axis_types = (AxisType.Auto,) * len(AXES)
    shape = (config.data, config.model)
    if config.device_order is not None:
        by_id = {d.id: d for d in devices}
        missing = [i for i in config.device_order if i not in by_id]
        if missing:
            raise ValueError(f"MeshConfig.device_order names unknown device ids {missing}")
        grid = np.array([by_id[i] for i in config.device_order], dtype=object).reshape(shape)
        return Mesh(grid, AXES, axis_types=axis_types)
    if config.size == len(devices):
        return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
    # A sub-mesh: keep jax's device order (process-major), which puts model groups on hosts.
    grid = np.array(devices[: config.size], dtype=object).reshape(shape)
    return Mesh(grid, AXES, axis_types=axis_types)


def abstract_mesh(config: MeshConfig) -> AbstractMesh:
    """Axis names and sizes without devices (for shardings of abstract shapes)."""
    return AbstractMesh((config.data, config.model), AXES,
                        axis_types=(AxisType.Auto,) * len(AXES))


def mesh_config_of(mesh: Mesh | AbstractMesh) -> MeshConfig:
    """The ``MeshConfig`` shape of a mesh with axes ``data`` and/or ``model``."""
    sizes = dict(mesh.shape)
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise ValueError(f"mesh axes must be among {AXES}, got {tuple(sizes)}")
    return MeshConfig(data=sizes.get(DATA, 1), model=sizes.get(MODEL, 1))
