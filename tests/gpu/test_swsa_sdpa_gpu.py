"""GPU check of SWSA through SDPA (swsa.SDPA_ATTENTION): bf16 autocast, compiled and eager, against the explicit form.

    python -m pytest -m gpu tests/gpu/test_swsa_sdpa_gpu.py -s

Two blocks (unshifted, shifted) at C = 192, 8 heads, on a padded 5 x 90 x 100 volume.
"""

from __future__ import annotations

import pytest
import torch

from gsmsr.archs import swsa
from gsmsr.archs.swsa import SWSAGroup

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]


def test_sdpa_matches_explicit_in_bf16(monkeypatch):
    torch.manual_seed(0)
    group = SWSAGroup(192, depth=2, num_heads=8).cuda().eval()
    with torch.no_grad():
        for blk in group.blocks:
            blk.attn.relative_position_bias_table.normal_(0, 1.0)
    x = torch.randn(1, 192, 5, 90, 100, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        want = group(x).float()
        monkeypatch.setattr(swsa, 'SDPA_ATTENTION', True)
        eager = group(x).float()
        torch._dynamo.reset()
        compiled = torch.compile(group)(x).float()
    errs = [float((y - want).norm() / want.norm()) for y in (eager, compiled)]
    print('SDPA against explicit, bf16: eager {:.1e}, compiled {:.1e}'.format(*errs))
    assert max(errs) <= 1e-2


def test_parts_compiled_piece_by_piece_match_one_part(monkeypatch):
    """A volume that SDPA attends in parts (``sdpa_part_windows`` lowered to two window planes: 2 parts), compiled
    with Inductor piece by piece (SWSABlock.attend_in_parts), against the same blocks eager in one part."""
    from gsmsr.archs.swsa import compile_swsa_blocks

    torch.manual_seed(0)
    group = SWSAGroup(192, depth=2, num_heads=8).cuda().eval()
    with torch.no_grad():
        for blk in group.blocks:
            blk.attn.relative_position_bias_table.normal_(0, 1.0)
    x = torch.randn(1, 192, 8, 90, 100, device='cuda')  # padded to 96 x 104: 4 x 12 x 13 windows
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        want = group(x).float()
        monkeypatch.setattr(swsa.WindowAttention, 'sdpa_part_windows', 2 * 12 * 13)
        assert len(group.blocks[1].sdpa_parts(x.permute(0, 2, 3, 4, 1))) == 2
        torch._dynamo.reset()
        compile_swsa_blocks(group.blocks)
        got = group(x).float()
    err = float((got - want).norm() / want.norm())
    print(f'SWSA in compiled parts against one eager part, bf16: {err:.1e}')
    assert err <= 1e-2
