"""Test entry: ``basicsr test -opt X.yml`` / ``gsmsr test ...`` / ``python gsmsr/test.py -opt X.yml``.

Runs BasicSR's own ``test_pipeline`` with GSMModel: every test set in the options is evaluated with the
protocol under ``val`` (chunks/tiles, metrics, centre frame only for Vimeo-90K-T). Under
``results/<name>/`` (current working directory) it writes the log with per-clip and average metrics,
``metrics_<dataset>.json`` and, with ``val.save_img``, the output frames. Weights come from
``path.pretrain_network_g`` (``param_key_g``: ``params_ema`` for checkpoints from ``basicsr train``; the file
falls back to ``params`` when it has no EMA weights); official GSMamba checkpoints load too.
"""

from __future__ import annotations

import os
import sys

if __name__ == '__main__' and not __package__:  # run as a script from a checkout
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or '.') == _here:
        sys.path.pop(0)  # the package folder itself must not shadow top-level modules
    sys.path.insert(0, os.path.dirname(_here))

from typing import Optional, Sequence  # noqa: E402

from gsmsr.train import report_pipeline  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``argv``: BasicSR's flags, e.g. ``['-opt', 'options/test_reds4.yml']``."""
    return report_pipeline('test', argv)


if __name__ == '__main__':
    sys.exit(main())
