"""Command-line entry points: ``gsmsr <subcommand>`` and the ``basicsr`` command.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and ``run(args) -> int``.
Every subcommand takes ``--debug`` (tracebacks with its one-line errors, also ``GSMSR_DEBUG=1``); see
:mod:`gsmsr.faults` for the exit codes. ``train`` / ``test`` keep BasicSR's own ``--debug``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
from typing import List, Optional

from gsmsr.faults import add_debug_argument

ALLOC_CONF_VARS = ('PYTORCH_CUDA_ALLOC_CONF', 'PYTORCH_ALLOC_CONF')  # a user's allocator settings are kept
# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    'demo': ('gsmsr.demo', 'train and evaluate a small GSMNet on the bundled real sample clips'),
    'infer': ('gsmsr.inference', 'upscale a video file or a folder of frames (streaming, bounded memory)'),
    'make-lmdb': ('gsmsr.data.make_lmdb', 'build LMDBs for REDS or Vimeo-90K in BasicSR layout'),
    'stress-flow': ('gsmsr.stress_flow', 'PSNR/SSIM of a checkpoint under perturbed optical flows (noise / dropout)'),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # train/test forward BasicSR's own flags untouched.
    if argv and argv[0] in ('train', 'test'):
        return basicsr_main(argv)
    parser = argparse.ArgumentParser(prog='gsmsr', description='Gather-Scatter Mamba video super-resolution.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.add_parser('train', help='train through BasicSR: gsmsr train -opt OPTIONS.yml [BasicSR flags]')
    sub.add_parser('test', help='evaluate through BasicSR: gsmsr test -opt OPTIONS.yml')
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    module = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_debug_argument(p)
        if name == chosen:  # import only the subcommand that runs
            if name == 'infer' and not any(os.environ.get(k) for k in ALLOC_CONF_VARS):
                # Before torch loads. Whole large frames free and re-take tensors of tens of GiB; the default
                # allocator's fixed segments then fragment (an H200 at 1080p: 58 GiB reserved but unused, OOM).
                os.environ[ALLOC_CONF_VARS[0]] = 'expandable_segments:True'
            gc.disable()  # the collector finds no cycles in torch's and BasicSR's import, only costs ~15 % of it
            try:
                module = importlib.import_module(module_name)
            finally:
                gc.enable()
            module.add_arguments(p)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    code = int(module.run(args) or 0)
    gc.freeze()  # the interpreter's exit no longer walks every object left (~2 s of a CPU run's exit)
    return code


def basicsr_main(argv: Optional[List[str]] = None) -> int:
    """``basicsr train|test -opt X [--launcher ...] [--auto_resume] [--debug] [--force_yml ...]``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ('train', 'test'):
        asked = bool(argv) and argv[0] in ('-h', '--help')
        print(
            'usage: basicsr {train,test} -opt OPTIONS.yml [--launcher none|pytorch|slurm] '
            '[--auto_resume] [--debug] [--force_yml KEY=VALUE ...]',
            file=sys.stdout if asked else sys.stderr,
        )
        return 0 if asked else 2
    module = importlib.import_module('gsmsr.train' if argv[0] == 'train' else 'gsmsr.test')
    return int(module.main(argv[1:]) or 0)


if __name__ == '__main__':
    sys.exit(main())
