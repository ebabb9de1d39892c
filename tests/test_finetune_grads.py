"""Token-level finetuning gives exactly the gradients of the whole-sequence loss."""

from __future__ import annotations

import numpy as np
import pytest

from coserve_jax.lora.config import ALL_TARGETS

from support import engine_grads, random_sequence, relative_error, tiny_model, whole_sequence_grads


@pytest.mark.parametrize("length,window,backward_layers,serve,block,backward_block", [
    (5, 7, 1, False, 256, 0),    # shorter than one window
    (30, 7, 1, True, 256, 0),    # several windows, one layer per piece, inference mixed in
    (30, 64, 2, False, 8, 0),    # one window, two layers per piece, blocked attention
    (41, 16, 4, True, 16, 0),    # the whole backward in one piece, blocked attention
    (41, 16, 2, True, 256, 16),  # token-block pieces: 3 blocks of 16 rows per layer
    (30, 7, 1, False, 256, 8),   # token-block pieces: 4 blocks, the last one partly padding
    (12, 8, 2, False, 256, 16),  # shorter than a block: whole-sequence pieces
    (30, 7, 1, True, 256, "keep"),  # projections saved in the forward, none recomputed
    (41, 16, 2, True, 16, "keep"),  # the same, two layers per piece, blocked attention
])
def test_gradients_equal_whole_sequence_jax_grad(length, window, backward_layers, serve, block,
                                                 backward_block):
    model = tiny_model()
    seq = random_sequence(np.random.default_rng(length), length)
    keep = backward_block == "keep"
    backward_block = 0 if keep else backward_block
    adapter, got, engine = engine_grads(model, seq, window, backward_layers, serve, block,
                                        backward_block=backward_block, keep_projections=keep)
    if keep:  # every layer's projections were saved, and the pieces read them
        saved = engine.runner.train.saved
        assert saved is not None and set(saved) == set(ALL_TARGETS)
        assert np.abs(np.asarray(saved["gate_proj"][:, :length])).max() > 0
    if backward_block and length > backward_block:  # one piece per layer and block
        blocks = -(-length // backward_block)
        assert engine.counters["backward_pieces"] == model.config.num_layers * blocks
    want = whole_sequence_grads(model, adapter, seq)
    for m in ALL_TARGETS:
        assert np.abs(want[m][0]).max() > 0 and np.abs(want[m][1]).max() > 0
        assert relative_error(got[m][0], np.asarray(want[m][0])) <= 1e-5, (m, "A")
        assert relative_error(got[m][1], np.asarray(want[m][1])) <= 1e-5, (m, "B")


def test_pieces_with_kept_projections_run_no_frozen_matmul_of_the_forward_again():
    """The piece's program itself: with the projections saved, the recomputed forward
    has no matmul of a frozen weight (the layer body the scan runs has one per projection
    fewer), only their pullbacks."""
    import functools

    import jax
    import jax.numpy as jnp

    from coserve_jax.finetune.buffers import TrainBuffers
    from coserve_jax.lora.slots import AdapterSlots
    from coserve_jax.models.llama import PROJECTIONS
    from coserve_jax.step import BackwardPiece, backward_piece_fn

    model = tiny_model()
    cfg = model.config
    slots = AdapterSlots.zeros(cfg, 2, 4, tuple(ALL_TARGETS), jnp.float32)
    piece = BackwardPiece(act_row=jnp.int32(0), layer_start=jnp.int32(0),
                          length=jnp.int32(30), adapter_slot=jnp.int32(0))

    def matmuls(keep: bool, layers: int) -> int:
        train = TrainBuffers.zeros(cfg, slots, 1, 32, jnp.float32, keep_projections=keep)
        fn = functools.partial(backward_piece_fn, cfg, num_layers=layers, seq_len=32)
        return str(jax.make_jaxpr(fn)(model.params, slots, train, piece)).count("dot_general")

    for layers in (1, 2):
        assert matmuls(False, layers) - matmuls(True, layers) == len(PROJECTIONS)


@pytest.mark.parametrize("with_loss", [0, 1, 3, 4, 5, 9, 16])
def test_loss_head_over_the_rows_with_a_loss_equals_the_head_over_every_row(with_loss):
    """The step's loss head runs over its rows with a loss only (the smallest compiled row
    count holding them): per-token losses of those rows and the gradient at every row equal
    the head over all rows, whose other rows have weight 0."""
    import jax
    import jax.numpy as jnp

    from coserve_jax.step import _head_loss, _training_loss

    model = tiny_model()
    cfg, params = model.config, model.params
    rng = np.random.default_rng(with_loss)
    num_tokens = 16
    x = jnp.asarray(rng.standard_normal((num_tokens, cfg.hidden_size)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, cfg.vocab_size, num_tokens), jnp.int32)
    weights = np.zeros(num_tokens, np.float32)
    weights[rng.choice(num_tokens, with_loss, replace=False)] = 1.0 / max(with_loss, 1)
    weights = jnp.asarray(weights)
    (_, ce_all), g_all = jax.value_and_grad(_head_loss, argnums=2, has_aux=True)(
        cfg, params, x, labels, weights)
    ce, g = jax.jit(lambda x: _training_loss(cfg, params, x, labels, weights))(x)
    np.testing.assert_allclose(ce * weights, ce_all * weights, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g, g_all, rtol=1e-5, atol=1e-8)
    assert np.all(np.asarray(ce)[np.asarray(weights) == 0] == 0)
    if with_loss:
        assert np.abs(np.asarray(g)).max() > 0
