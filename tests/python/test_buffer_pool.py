"""The CPU kernels' buffer pool: outputs reuse freed blocks of their size, never a block
a tensor still holds, and the limit and release calls do what they say."""

import pytest
import torch

import qat
from qat import ops

# 8 x 32 x 32 x 32 float32 = 1 MiB: above the pool's 64 KiB floor.
SHAPE = (8, 32, 32, 32)


def reference_fake_quantize(x, scale, zero_point, quant_min, quant_max):
    # ATen's kernel: x times the float32 reciprocal of the scale, as qat's (x / scale rounds
    # a few ties the other way).
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)


@pytest.fixture()
def pool():
    """A pool with the default limit, emptied before and after the test."""
    previous = ops.set_buffer_pool_limit(2 << 30)
    ops.release_buffers()
    yield
    ops.release_buffers()
    ops.set_buffer_pool_limit(previous)


def step(x):
    y = qat.fake_quantize(x, 0.05, 3, 0, 255)
    y.backward(torch.ones_like(y))
    return y


def test_freed_outputs_are_reused_and_held_ones_are_not(pool):
    x = torch.randn(SHAPE, requires_grad=True)
    first = qat.fake_quantize(x.detach(), 0.05, 3, 0, 255)
    first_ptr = first.data_ptr()
    expected_first = first.clone()
    # `first` is held: a second output of its size must go elsewhere.
    second = qat.fake_quantize(x.detach() * 2, 0.05, 3, 0, 255)
    assert second.data_ptr() != first_ptr
    assert torch.equal(first, expected_first)
    del first
    third = qat.fake_quantize(x.detach(), 0.05, 3, 0, 255)
    assert third.data_ptr() == first_ptr
    assert torch.equal(third, reference_fake_quantize(x.detach(), 0.05, 3, 0, 255))


def test_training_steps_hit_the_pool_with_correct_values(pool):
    x = torch.randn(SHAPE, requires_grad=True)
    # Two warm-up steps: while the second runs, the first one's output is still held.
    for _ in range(2):
        y = step(x)
        x.grad = None
    x_ref = x.detach().clone().requires_grad_()
    reference_fake_quantize(x_ref, 0.05, 3, 0, 255).backward(torch.ones(SHAPE))
    before = ops.buffer_pool_stats()
    for _ in range(3):
        y = step(x)
        assert torch.equal(x.grad, x_ref.grad)
        assert torch.equal(y.detach(), reference_fake_quantize(x.detach(), 0.05, 3, 0, 255))
        x.grad = None
    after = ops.buffer_pool_stats()
    # Each step: the output, the code its backward reads, the input gradient.
    assert after["hits"] - before["hits"] == 9
    assert after["misses"] == before["misses"]
    assert after["bytes"] <= after["limit"]


def test_small_tensors_are_not_pooled(pool):
    before = ops.buffer_pool_stats()
    qat.fake_quantize(torch.randn(16, 16), 0.05, 3, 0, 255)
    after = ops.buffer_pool_stats()
    assert (after["hits"], after["misses"], after["blocks"]) == (
        before["hits"], before["misses"], before["blocks"])


def test_limit_zero_turns_pooling_off_and_release_frees(pool):
    x = torch.randn(SHAPE)
    qat.fake_quantize(x, 0.05, 3, 0, 255)
    assert ops.buffer_pool_stats()["free_bytes"] >= x.numel() * 4
    ops.release_buffers()
    assert ops.buffer_pool_stats()["bytes"] == 0
    assert ops.set_buffer_pool_limit(0) == 2 << 30
    y = qat.fake_quantize(x, 0.05, 3, 0, 255)
    assert ops.buffer_pool_stats()["blocks"] == 0
    assert torch.equal(y, reference_fake_quantize(x, 0.05, 3, 0, 255))


def test_limit_caps_what_the_pool_keeps(pool):
    block = 8 * 32 * 32 * 32 * 4
    ops.set_buffer_pool_limit(block + block // 2)
    x = torch.randn(SHAPE)
    held = [qat.fake_quantize(x, 0.05, 3, 0, 255) for _ in range(3)]
    stats = ops.buffer_pool_stats()
    assert stats["bytes"] <= stats["limit"] and stats["blocks"] == 1
    for y in held:
        assert torch.equal(y, reference_fake_quantize(x, 0.05, 3, 0, 255))


def test_channels_last_output_keeps_its_layout(pool):
    x = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        y = qat.fake_quantize(x, 0.05, 3, 0, 255)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, reference_fake_quantize(x, 0.05, 3, 0, 255))


def test_bad_limits_are_refused():
    with pytest.raises(RuntimeError, match="bytes must be non-negative"):
        ops.set_buffer_pool_limit(-1)
    with pytest.raises(TypeError, match="limit_bytes must be an int"):
        ops.set_buffer_pool_limit(1.5)


def test_lowering_the_limit_releases_blocks_in_use_once_they_are_free(pool):
    x = torch.randn(SHAPE)
    held = qat.fake_quantize(x, 0.05, 3, 0, 255)
    assert ops.buffer_pool_stats()["blocks"] == 1
    ops.set_buffer_pool_limit(0)
    assert ops.buffer_pool_stats()["blocks"] == 1  # still held by `held`
    del held
    qat.fake_quantize(torch.randn(256, 256), 0.05, 3, 0, 255)  # any request of 64 KiB or more
    assert ops.buffer_pool_stats()["bytes"] == 0
