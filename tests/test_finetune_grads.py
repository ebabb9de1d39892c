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
])
def test_gradients_equal_whole_sequence_jax_grad(length, window, backward_layers, serve, block,
                                                 backward_block):
    model = tiny_model()
    seq = random_sequence(np.random.default_rng(length), length)
    adapter, got, engine = engine_grads(model, seq, window, backward_layers, serve, block,
                                        backward_block=backward_block)
    if backward_block and length > backward_block:  # one piece per layer and block
        blocks = -(-length // backward_block)
        assert engine.counters["backward_pieces"] == model.config.num_layers * blocks
    want = whole_sequence_grads(model, adapter, seq)
    for m in ALL_TARGETS:
        assert np.abs(want[m][0]).max() > 0 and np.abs(want[m][1]).max() > 0
        assert relative_error(got[m][0], np.asarray(want[m][0])) <= 1e-5, (m, "A")
        assert relative_error(got[m][1], np.asarray(want[m][1])) <= 1e-5, (m, "B")
