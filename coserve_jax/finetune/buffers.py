"""Device buffers of token-level finetuning, threaded through the step and donated.

A training sequence owns one row block of ``max_len`` rows in the activation
store. Its forward windows save each layer's input there and, with
``keep_projections``, every projection's output (``saved``: FlexLLM's graph
pruning, so a backward piece runs no frozen matmul of the forward again; only
attention and the elementwise ops are recomputed). Without it the input is all
the backward keeps and the piece recomputes the whole layer. The loss gradient
w.r.t. the last layer's output goes into ``grads_h``, and each backward piece
(a few layers over the whole sequence) replaces it with the gradient w.r.t. the
input of the piece's first layer, while adding LoRA gradients into the per-slot
accumulators.

With data parallelism the accumulators carry a leading axis of one partial sum
per data shard (``groups``), summed once per optimizer step; on one device and
with pure model parallelism there is no such axis.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from coserve_jax.config import ModelConfig
from coserve_jax.lora.adapter import module_shape
from coserve_jax.lora.config import ALL_TARGETS
from coserve_jax.lora.slots import AdapterSlots


@flax.struct.dataclass
class TrainBuffers:
    """Saved activations, boundary gradients and LoRA gradient accumulators."""

    acts: jax.Array  # [L, A * max_len, D] model dtype: input of every layer, per token
    grads_h: jax.Array  # [A * max_len, D] float32: dLoss/d(hidden) at the current boundary
    grad_a: dict[str, jax.Array]  # module -> [L, N, in, R] float32 (or [G, L, N, in, R])
    grad_b: dict[str, jax.Array]  # module -> [L, N, R, out] float32 (or [G, L, N, R, out])
    # [A * max_len, D] float32: the input gradient of the layer whose token blocks are being
    # pulled back, summed over blocks; None unless token-block pieces are used.
    grads_next: jax.Array | None = None
    # projection -> [L, A * max_len, out] model dtype: every projection's output, per token
    # (q_proj Hq*Dh, k_proj and v_proj Hkv*Dh, o_proj and down_proj D, gate_proj and
    # up_proj F); None unless ``keep_projections``.
    saved: dict[str, jax.Array] | None = None

    @classmethod
    def zeros(cls, cfg: ModelConfig, slots: AdapterSlots, num_seqs: int, max_len: int,
              dtype, groups: int = 1, blocks: bool = False,
              keep_projections: bool = False) -> TrainBuffers:
        """Empty buffers; ``groups`` > 1 gives the accumulators one partial sum per data
        shard (a leading axis of that size); ``blocks`` adds ``grads_next`` for token-block
        backward pieces; ``keep_projections`` adds ``saved``."""
        rows = num_seqs * max_len
        lead = (groups,) if groups > 1 else ()
        saved = None
        if keep_projections:
            saved = {name: jnp.zeros((cfg.num_layers, rows, module_shape(cfg, name)[1]), dtype)
                     for name in ALL_TARGETS}
        return cls(
            acts=jnp.zeros((cfg.num_layers, rows, cfg.hidden_size), dtype),
            grads_h=jnp.zeros((rows, cfg.hidden_size), jnp.float32),
            grad_a={m: jnp.zeros(lead + a.shape, jnp.float32) for m, a in slots.a.items()},
            grad_b={m: jnp.zeros(lead + b.shape, jnp.float32) for m, b in slots.b.items()},
            grads_next=jnp.zeros((rows, cfg.hidden_size), jnp.float32) if blocks else None,
            saved=saved,
        )

    @property
    def num_rows(self) -> int:
        return self.grads_h.shape[0]

    @property
    def grad_groups(self) -> int:
        """Partial-sum groups of the accumulators (1: no group axis)."""
        first = next(iter(self.grad_a.values()), None)
        return 1 if first is None or first.ndim == 4 else first.shape[0]


def drop_negative(index: jax.Array, size: int) -> jax.Array:
    """Maps -1 ("nowhere") to an out-of-range index that ``mode="drop"`` scatters discard."""
    return jnp.where(index < 0, size, index)
