"""Training entry: ``basicsr train -opt X.yml`` / ``gsmsr train ...`` / ``python gsmsr/train.py -opt X.yml``.

Runs BasicSR's own ``train_pipeline`` with GSMNet and GSMModel registered, and BasicSR's flags:
``-opt``, ``--launcher {none,pytorch,slurm}``, ``--auto_resume``, ``--debug``, ``--force_yml key:sub=value``.
``experiments/`` and ``tb_logger/`` are created under the current working directory.

Multi-GPU (one process per GPU, NCCL; CPU processes use gloo)::

    torchrun --nproc_per_node=8 gsmsr/train.py -opt options/train_gsm_reds.yml --launcher pytorch
    # several nodes: the usual torchrun rendezvous flags, e.g. on each node
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 --rdzv_id=gsm gsmsr/train.py -opt X.yml --launcher pytorch

``main`` can be called several times in one process (each call gets a fresh log file).

Unknown keys in the options' ``train`` / ``val`` / ``path`` / ``network_g`` sections are an error naming the
nearest known key (:mod:`gsmsr.option_keys`; top-level ``allow_unknown_keys: true`` allows them). Failures are
one line on stderr (exit 2 bad options or input, 1 environment or unexpected, 128 + signal number when
interrupted; :mod:`gsmsr.faults`); BasicSR's ``--debug`` or ``GSMSR_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import os
import sys

if __name__ == '__main__' and not __package__:  # run as a script from a checkout
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or '.') == _here:
        sys.path.pop(0)  # the package folder itself must not shadow top-level modules
    sys.path.insert(0, os.path.dirname(_here))

import contextlib  # noqa: E402
import logging  # noqa: E402
import os.path as osp  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence  # noqa: E402

import gsmsr  # noqa: E402,F401  (compatibility fixes, registers GSMNet / GSMModel)

PACKAGE_ROOT = osp.dirname(osp.dirname(osp.abspath(gsmsr.__file__)))


def resolve_package_paths(opt: Dict[str, Any]) -> None:
    """Let ``meta_info_file: gsmsr/data/meta_info/...`` work from any working directory.

    A relative ``meta_info_file`` that does not exist under the working directory but exists relative to the
    installed package (the shipped REDS meta-info files) is replaced by that absolute path.
    """
    for dataset in opt.get('datasets', {}).values():
        path = dataset.get('meta_info_file')
        if path and not osp.isabs(path) and not osp.exists(path):
            candidate = osp.join(PACKAGE_ROOT, path)
            if osp.exists(candidate):
                dataset['meta_info_file'] = candidate


def _normalise_argv(argv: Sequence[str]) -> List[str]:
    # torch.distributed.launch passes --local-rank=N (hyphen); BasicSR's parser knows --local_rank.
    return [a.replace('--local-rank', '--local_rank', 1) if a.startswith('--local-rank') else a for a in argv]


def reset_basicsr_logger() -> None:
    """Close and drop the 'basicsr' logger's handlers so the next run writes its own log file."""
    from basicsr.utils import logger as basicsr_logger

    log = logging.getLogger('basicsr')
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    basicsr_logger.initialized_logger.pop('basicsr', None)


@contextlib.contextmanager
def _basicsr_run(module: ModuleType, argv: Sequence[str], prog: str) -> Iterator[None]:
    """sys.argv for BasicSR's parser, package paths in the options, a fresh logger and process-group cleanup."""
    import torch.distributed as dist

    original_parse = module.parse_options

    def parse_options(root_path: str, is_train: bool = True):
        from gsmsr.option_keys import check_option_keys

        opt, args = original_parse(root_path, is_train=is_train)
        check_option_keys(opt, args.opt)
        resolve_package_paths(opt)
        return opt, args

    had_group = dist.is_available() and dist.is_initialized()
    saved_argv = sys.argv
    sys.argv = [prog] + _normalise_argv(argv)
    module.parse_options = parse_options
    reset_basicsr_logger()
    try:
        yield
    finally:
        module.parse_options = original_parse
        sys.argv = saved_argv
        reset_basicsr_logger()
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_pipeline(kind: str, argv: Optional[Sequence[str]]) -> None:
    """Run BasicSR's ``train_pipeline`` or ``test_pipeline`` with root path = the working directory; raises on
    failure (:func:`report_pipeline` is the command's version)."""
    import importlib

    from gsmsr.faults import InputError

    module = importlib.import_module(f'basicsr.{kind}')
    pipeline: Callable[[str], None] = getattr(module, f'{kind}_pipeline')
    argv = list(sys.argv[1:] if argv is None else argv)
    opt_file = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ('-opt', '--opt')), None)
    if opt_file is not None and not os.path.isfile(opt_file):
        raise InputError(f'{opt_file}: no such options file')
    with _basicsr_run(module, argv, prog=f'basicsr {kind}'):
        pipeline(os.getcwd())


def report_pipeline(kind: str, argv: Optional[Sequence[str]]) -> int:
    """:func:`run_pipeline` with failures reported in one line (:func:`gsmsr.faults.run_reporting_errors`);
    returns the exit code. BasicSR's ``--debug`` also shows tracebacks."""
    from gsmsr.faults import run_reporting_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    # Checkpoints, states and results are written atomically, so an interruption leaves the last complete ones.
    return run_reporting_errors(
        f'basicsr {kind}', lambda: run_pipeline(kind, argv), 'interrupted', debug='--debug' in argv
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``argv``: BasicSR's flags, e.g. ``['-opt', 'options/train_gsm_reds.yml', '--auto_resume']``."""
    return report_pipeline('train', argv)


if __name__ == '__main__':
    sys.exit(main())
