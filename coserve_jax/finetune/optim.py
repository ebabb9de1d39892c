"""Optimizer settings and the optax transform they build."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """How a finetuning job updates its adapter."""

    name: str = "adamw"
    """``adamw`` or ``sgd``."""
    learning_rate: float = 1e-3
    """Peak learning rate."""
    schedule: str = "constant"
    """``constant``, ``linear`` (decay to 0) or ``cosine`` (decay to 0), after warm-up."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to the peak."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    b1: float = 0.9
    """Adam first-moment decay."""
    b2: float = 0.999
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam epsilon."""
    momentum: float = 0.0
    """SGD momentum (0 is plain SGD)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None disables clipping."""

    def __post_init__(self):
        if self.name not in ("adamw", "sgd"):
            raise ValueError(f"optimizer name must be 'adamw' or 'sgd', got {self.name!r}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule must be constant, linear or cosine, got {self.schedule!r}")
        for field in ("learning_rate", "weight_decay", "momentum", "eps"):
            value = getattr(self, field)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"optimizer {field} must be a finite number >= 0, got {value!r}")
        if self.learning_rate == 0:
            raise ValueError("optimizer learning_rate must be positive")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")

    def schedule_fn(self, total_steps: int) -> optax.Schedule:
        peak, warm = self.learning_rate, self.warmup_steps
        decay_steps = max(total_steps - warm, 1)
        if self.schedule == "constant":
            after = optax.constant_schedule(peak)
        elif self.schedule == "linear":
            after = optax.linear_schedule(peak, 0.0, decay_steps)
        else:
            after = optax.cosine_decay_schedule(peak, decay_steps)
        if warm == 0:
            return after
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])

    def build(self, total_steps: int) -> optax.GradientTransformation:
        lr = self.schedule_fn(total_steps)
        if self.name == "adamw":
            tx = optax.adamw(lr, b1=self.b1, b2=self.b2, eps=self.eps,
                             weight_decay=self.weight_decay)
        else:
            tx = optax.sgd(lr, momentum=self.momentum or None)
        if self.max_grad_norm is None:
            return tx
        return optax.chain(optax.clip_by_global_norm(self.max_grad_norm), tx)


def apply_update(tx: optax.GradientTransformation, rank: int, table_modules: tuple[str, ...],
                 targets: tuple[str, ...], params, opt_state, train, slot, num_seqs):
    """One optimizer step of a job from its slot's accumulated gradients (averaged over
    ``num_seqs`` sequences); the pure function ``programs.build_optimizer_update`` jits.

    ``params``: the job's ``{module: {"a": [L, in, r], "b": [L, r, out]}}``; ``train``: the
    ``TrainBuffers``. Returns (params, opt_state, train with the slot's accumulators
    cleared, {"a", "b"}: the new weights padded to the table's rank for the slot write,
    grad_norm). With per-data-shard partial accumulators this is where they are summed:
    the one cross-shard gradient reduction of an optimizer step."""
    def slot_grad(g):  # [(G,) L, N, ...] -> [L, ...]
        g = jnp.take(g, slot, axis=g.ndim - 3)
        return g if g.ndim == 3 else jnp.sum(g, axis=0)

    grads = {m: {"a": slot_grad(train.grad_a[m])[..., :rank] / num_seqs,
                 "b": slot_grad(train.grad_b[m])[:, :rank, :] / num_seqs}
             for m in targets}
    grad_norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    train = train.replace(
        grad_a={m: g.at[..., slot, :, :].set(0.0) for m, g in train.grad_a.items()},
        grad_b={m: g.at[..., slot, :, :].set(0.0) for m, g in train.grad_b.items()})
    padded_a, padded_b = {}, {}
    for m in table_modules:
        a_shape = train.grad_a[m].shape[-4:-3] + train.grad_a[m].shape[-2:]
        b_shape = train.grad_b[m].shape[-4:-3] + train.grad_b[m].shape[-2:]
        pa, pb = jnp.zeros(a_shape, jnp.float32), jnp.zeros(b_shape, jnp.float32)
        if m in params:
            pa = pa.at[..., :rank].set(params[m]["a"])
            pb = pb.at[:, :rank].set(params[m]["b"])
        padded_a[m], padded_b[m] = pa, pb
    return params, opt_state, train, {"a": padded_a, "b": padded_b}, grad_norm
