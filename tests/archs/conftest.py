"""Fixtures of the network's tests."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, List

import pytest
from torch import Tensor


@pytest.fixture
def windows_and_merged() -> Callable[[], ContextManager[List[Tensor]]]:
    """A context manager that records, block by block, the windows ``SWSABlock.attention_windows`` returns and the
    attended windows ``SWSABlock.attention_merge`` receives (the class's own methods again on exit, before anything
    compiles them)."""
    from gsmsr.archs.swsa import SWSABlock

    @contextlib.contextmanager
    def record() -> Iterator[List[Tensor]]:
        held: List[Tensor] = []
        windows, merge = SWSABlock.attention_windows, SWSABlock.attention_merge
        with pytest.MonkeyPatch.context() as m:
            m.setattr(SWSABlock, 'attention_windows', lambda self, x: held.append(windows(self, x)) or held[-1])
            m.setattr(SWSABlock, 'attention_merge', lambda self, x, o: held.append(o) or merge(self, x, o))
            yield held

    return record
