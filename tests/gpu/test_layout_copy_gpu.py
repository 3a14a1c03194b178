"""GPU check of the tiled copy between channels-last and channel-first frames (gsmsr.ops.layout_copy), compiled.

    python -m pytest -m gpu tests/gpu/test_layout_copy_gpu.py -s

At the stream's shapes (180 x 320 frames, 192 channels, slabs of 16 frames), both directions, with and without a
cast: bit for bit ``Tensor.copy_``'s values (fp32 -> bf16 rounds to nearest even in both).
"""

from __future__ import annotations

import pytest
import torch

from gsmsr.ops.layout_copy import copy_frames, transposes
from gsmsr.ops.triton_jit import triton_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_available(), reason='needs CUDA and Triton')]


@pytest.mark.parametrize('shape', [(1, 192, 180, 320), (1, 192, 16, 180, 320)])
@pytest.mark.parametrize('src_dtype, dst_dtype', [(torch.bfloat16,) * 2, (torch.bfloat16, torch.float32),
                                                  (torch.float32, torch.bfloat16)])  # fmt: skip
@pytest.mark.parametrize('src_cl', [True, False])
def test_copy_frames_is_copy_(shape, src_dtype, dst_dtype, src_cl):
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    g = torch.Generator(device='cuda').manual_seed(0)
    src = torch.randn(shape, device='cuda', generator=g).to(src_dtype)
    dst = torch.empty(shape, device='cuda', dtype=dst_dtype)
    if src_cl:
        src = src.contiguous(memory_format=fmt)
    else:
        dst = dst.contiguous(memory_format=fmt)
    assert transposes(dst, src)
    copy_frames(dst, src)
    assert torch.equal(dst, torch.empty_like(dst).copy_(src))
