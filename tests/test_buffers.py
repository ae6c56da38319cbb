"""The receive-buffer pool: reuse only memory that nothing references any more."""

from __future__ import annotations

import pytest
import torch

from layerwise.runtime.buffers import STEPS_KEPT, BufferPool, pool_supported
from layerwise.runtime.stage import Stage
from layerwise.runtime.tree import TensorMeta

META = TensorMeta((4, 8), torch.float32)
pytestmark = pytest.mark.timeout(60)


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_pool_is_for_cpu_only() -> None:
    assert pool_supported(torch.device("cpu"))
    assert not pool_supported(torch.device("meta"))


def test_released_buffer_is_reused_and_held_one_is_not() -> None:
    pool = BufferPool()
    a = pool.take(META)
    a.fill_(1.0)
    ptr = a.untyped_storage().data_ptr()
    pool.reclaim()
    b = pool.take(META)
    assert b.untyped_storage().data_ptr() != ptr  # a is still alive: never handed out twice
    del a
    pool.reclaim()
    c = pool.take(META)
    assert c.untyped_storage().data_ptr() == ptr
    assert not same_memory(b, c)
    assert c.shape == (4, 8) and c.dtype == torch.float32


def test_views_and_detached_aliases_keep_a_buffer_lent() -> None:
    pool = BufferPool()
    buf = pool.take(META)
    ptr = buf.untyped_storage().data_ptr()
    view = buf[1:]
    alias = view.detach().requires_grad_(True)
    del buf, view
    pool.reclaim()
    fresh = pool.take(META)  # kept, so it stays lent and cannot be handed out below
    assert fresh.untyped_storage().data_ptr() != ptr
    del alias
    pool.reclaim()
    assert pool.take(META).untyped_storage().data_ptr() == ptr


def test_a_stashed_stage_input_is_not_reused_before_its_backward() -> None:
    # The received activation becomes the stage's input; a Linear saves it for its backward.
    pool = BufferPool()
    stage = Stage(1, 0, [torch.nn.Linear(8, 8)])
    x = pool.take(META)
    x.normal_()
    ptr = x.untyped_storage().data_ptr()
    expected_in = x.clone()
    out, _ = stage.forward_step(0, x, None, recompute=False, capture=False)
    del x
    pool.reclaim()
    other = pool.take(META)
    assert other.untyped_storage().data_ptr() != ptr
    other.fill_(123.0)  # would corrupt the saved input if the memory were shared
    stage.backward_step(0, [torch.ones_like(out)], None)
    weight = stage.layers[0].weight
    assert weight.grad is not None
    torch.testing.assert_close(weight.grad, torch.ones(4, 8).T @ expected_in)
    del out
    pool.reclaim()
    assert pool.take(META).untyped_storage().data_ptr() == ptr


def test_lengths_taking_turns_keep_their_buffers_and_gone_ones_are_dropped() -> None:
    pool = BufferPool()
    other = TensorMeta((2, 2), torch.float64)
    for step in range(6):  # two shapes in turn: each made once, then reused
        taken = pool.take(META if step % 2 else other)
        del taken
        pool.end_step()
    assert pool.allocations == 2
    assert pool.held_bytes() == 2 * 2 * 8 + 4 * 8 * 4
    for _ in range(STEPS_KEPT):  # (2, 2) no longer asked for: dropped after STEPS_KEPT steps
        kept = pool.take(META)
        del kept
        pool.end_step()
    assert pool.held_bytes() == 4 * 8 * 4
    assert pool.allocations == 2


def test_first_stage_inputs_get_no_gradient() -> None:
    first = Stage(0, 0, [torch.nn.Linear(8, 8)])
    second = Stage(1, 1, [torch.nn.Linear(8, 8)])
    x = torch.randn(4, 8)
    out0, _ = first.forward_step(0, x, None, recompute=False, capture=False)
    out1, _ = second.forward_step(0, out0, None, recompute=False, capture=False)
    assert first.backward_step(0, [torch.ones_like(out0)], None) == []
    assert len(second.backward_step(0, [torch.ones_like(out1)], None)) == 1
    assert x.grad is None


def test_first_stage_without_parameters_has_nothing_to_back_propagate() -> None:
    stage = Stage(0, 0, [torch.nn.ReLU()])
    out, _ = stage.forward_step(0, torch.randn(2, 3), None, recompute=False, capture=False)
    assert not out.requires_grad
    assert stage.backward_step(0, [torch.ones_like(out)], None) == []
    assert 0 not in stage.stash


def test_no_tensor_waits_for_the_garbage_collector() -> None:
    # Received activations are reused (and freed) by reference counting alone: nothing the
    # runtime builds may put a tensor in a reference cycle, or it would live until gc runs.
    import gc

    import layerwise as lw

    layers = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(4)]
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    enabled = gc.isenabled()
    gc.disable()
    try:
        for schedule in ("1f1b", "zb-h1"):
            for ckpt in ("never", "always"):
                pipe = lw.Pipeline(
                    layers,
                    schedule=schedule,
                    microbatches=4,
                    loss_fn=torch.nn.functional.mse_loss,
                    recompute=ckpt,
                )
                gc.collect()
                gc.set_debug(gc.DEBUG_SAVEALL)
                pipe.train_step(x, y)
                pipe.forward(x)
                gc.collect()
                leaked = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
                gc.garbage.clear()
                gc.set_debug(0)
                assert leaked == [], (schedule, ckpt, [t.shape for t in leaked])
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
