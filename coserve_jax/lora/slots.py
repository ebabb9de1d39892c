"""The adapter slot table of the step and the host registry that fills it.

The table is a fixed-size pytree (slots x layers x padded rank) that the step
reads; the runner owns it (``coserve_jax.runner``). The registry is host
bookkeeping: names to slot indices. Loading, replacing or unloading an adapter
hands the runner one ``WriteSlot`` command, a donated update of one slot whose
shapes never change, so nothing recompiles. The step's multi-slot ``LoraFn`` over
this table is ``Kernels.multi_slot_lora`` (``pallas_kernels.dispatch``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from coserve_jax.config import ModelConfig
from coserve_jax.errors import AlreadyExists, CapacityExhausted, InvalidRequest, NotFound
from coserve_jax.lora.adapter import LoraAdapter, module_shape
from coserve_jax.lora.config import ALL_TARGETS
from coserve_jax.runner_commands import WriteSlot


@flax.struct.dataclass
class AdapterSlots:
    """LoRA weights of every slot, layers leading so the layer scan slices them."""

    a: dict[str, jax.Array]  # module -> [L, N, in, R]
    b: dict[str, jax.Array]  # module -> [L, N, R, out]
    scale: jax.Array  # [N] float32; 0 for an empty slot

    @classmethod
    def zeros(cls, cfg: ModelConfig, num_slots: int, max_rank: int,
              modules: tuple[str, ...], dtype) -> AdapterSlots:
        a, b = {}, {}
        for m in modules:
            fan_in, fan_out = module_shape(cfg, m)
            a[m] = jnp.zeros((cfg.num_layers, num_slots, fan_in, max_rank), dtype)
            b[m] = jnp.zeros((cfg.num_layers, num_slots, max_rank, fan_out), dtype)
        return cls(a=a, b=b, scale=jnp.zeros((num_slots,), jnp.float32))

    def per_layer(self) -> dict[str, tuple[jax.Array, jax.Array]]:
        """What the layer scan slices: module -> (a, b) with layers leading."""
        return {m: (self.a[m], self.b[m]) for m in self.a}


def write_slot_fn(slots: AdapterSlots, index, a, b, scale) -> AdapterSlots:
    """``slots`` with slot ``index`` rewritten: ``a``/``b`` module -> [L, in, R] / [L, R, out]
    (rank padded), ``scale`` its LoRA scale (0 for an empty slot)."""
    return AdapterSlots(
        a={m: slots.a[m].at[:, index].set(a[m].astype(slots.a[m].dtype)) for m in slots.a},
        b={m: slots.b[m].at[:, index].set(b[m].astype(slots.b[m].dtype)) for m in slots.b},
        scale=slots.scale.at[index].set(scale),
    )


@dataclasses.dataclass
class SlotInfo:
    name: str
    index: int
    adapter: LoraAdapter


def slot_modules(modules) -> tuple[str, ...]:
    """The projections a table carries, in the canonical order of ``ALL_TARGETS``."""
    return tuple(m for m in ALL_TARGETS if m in modules)


class AdapterRegistry:
    """Names to slots, and the device table they live in."""

    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int,
                 modules: tuple[str, ...], execute: Callable[[WriteSlot], object]):
        """``modules``: the projections the table carries (``slot_modules``); ``execute``:
        the runner's ``execute``, which the registry hands its slot writes."""
        self.cfg = cfg
        self.max_rank = max_rank
        self.modules = modules
        self.num_slots = num_slots
        self._execute = execute
        self._by_name: dict[str, SlotInfo] = {}
        self._free = list(range(num_slots - 1, -1, -1))

    def check_loadable(self, adapter: LoraAdapter, replace: bool = False) -> None:
        """Raises ``ValueError`` for an adapter this table cannot hold."""
        adapter.check_matches(self.cfg)
        if adapter.config.r > self.max_rank:
            raise InvalidRequest(f"adapter {adapter.name!r} has rank {adapter.config.r}, above the "
                             f"slot maximum {self.max_rank}")
        extra = set(adapter.config.target_modules) - set(self.modules)
        if extra:
            raise InvalidRequest(f"adapter {adapter.name!r} targets {sorted(extra)}, which this "
                             f"engine's slots do not carry (configured: {list(self.modules)})")
        if adapter.name in self._by_name and not replace:
            raise AlreadyExists(f"an adapter named {adapter.name!r} is already loaded")
        if adapter.name not in self._by_name and not self._free:
            raise CapacityExhausted(f"all {self.num_slots} adapter slots are in use")

    def load(self, adapter: LoraAdapter, replace: bool = False) -> int:
        """Writes the adapter into a slot (its own slot when replacing); returns the index."""
        self.check_loadable(adapter, replace)
        info = self._by_name.get(adapter.name)
        index = info.index if info is not None else self._free.pop()
        self.write(index, adapter)
        self._by_name[adapter.name] = SlotInfo(adapter.name, index, adapter)
        return index

    def write(self, index: int, adapter: LoraAdapter) -> None:
        """Writes weights into slot ``index`` (padding the rank with zeros)."""
        a, b = {}, {}
        for m in self.modules:
            fan_in, fan_out = module_shape(self.cfg, m)
            pa = np.zeros((self.cfg.num_layers, fan_in, self.max_rank), np.float32)
            pb = np.zeros((self.cfg.num_layers, self.max_rank, fan_out), np.float32)
            if m in adapter.config.target_modules:
                r = adapter.config.r
                pa[..., :r] = np.asarray(adapter.a[m])
                pb[:, :r] = np.asarray(adapter.b[m])
            a[m], b[m] = pa, pb
        self._execute(WriteSlot(index, a, b, float(adapter.config.scale)))

    def unload(self, name: str) -> None:
        info = self._by_name.pop(name, None)
        if info is None:
            raise NotFound(f"no adapter named {name!r}")
        self._execute(WriteSlot(info.index, None, None, 0.0))
        self._free.append(info.index)

    def slot_of(self, name: str | None) -> int:
        """The slot index of an adapter name; -1 for None (the base model)."""
        if name is None:
            return -1
        if name not in self._by_name:
            raise NotFound(f"no adapter named {name!r}")
        return self._by_name[name].index

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str) -> LoraAdapter:
        return self._by_name[name].adapter
