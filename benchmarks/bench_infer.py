"""``gsmsr infer`` end to end: the real command in a fresh process (start-up and compilation included).

    python benchmarks/bench_infer.py [--cases 360x640x100,1080x1920x40,1080x1920x20] [--cache fresh,warm]
                                     [--cache-dir DIR] [--precision bf16] [--config release|tiny]
                                     [--no-reference] [--run-timeout SECONDS] [--set MODULE.NAME=VALUE]
                                     [--profile] [--gpu-waits] [-- EXTRA ARGS]

For each case (LR HxWxFRAMES) the frames are a synthetic moving texture written as PNGs, the network the released
configuration with random weights (speed and memory do not depend on the weights), the output a PNG folder.
Each run is ``python -m gsmsr infer ... --stats-json`` in a new process whose compile caches live in one folder of
this benchmark (``XDG_CACHE_HOME``; ``TORCHINDUCTOR_CACHE_DIR`` / ``TRITON_CACHE_DIR`` are cleared): ``fresh``
empties it first, ``warm`` runs on what earlier runs left there. A case whose first mode is ``warm`` gets an
unreported warm-up run first, unless ``--cache-dir`` names a folder that earlier invocations filled (so long
cases can be split over several invocations).

Reported: frames/s of the streaming part, the process's wall time, time from launch to the first output frame
written, peak GPU memory (``torch.cuda.max_memory_allocated`` in the infer process) and peak host RSS, the tile
and tiles per call chosen, ``chunk`` (frames per network call), ``SWSA`` (over whole chunks or in slabs),
``GPU_busy`` (the stats' ``gpu_busy_steady``: the share of the time after the first chunk in which the GPU runs the
network, from CUDA events around each network call; empty on CPU or with one chunk; issue 16 target: >= 90 %), and
the network-only time for the same LR pixels:
bench_gsm's default row (compiled bf16 streaming, T x 180 x 320) timed in its own process in the same run, scaled by
LR pixel-frames. The ``vs net`` column is streaming seconds over that (issue 16 target: <= 1.25 on long clips).

After each run a second table gives its launch timeline (the stats' ``timeline``, see ``gsmsr.inference.TIMELINE``):
seconds from this script's launch of the process to each start-up phase (imports, device, network built, weights
loaded, on the device, compile caches, streaming, first chunk queued, first frame written), with the step from the
phase before, then the end of streaming and the process's exit; and the peak host memory so far at the phases
where the run records it (``host_peak_at``).

Logs go to ``$OUT/bench_infer`` when ``OUT`` is set: each run's stdout and stderr stream into ``<case>-<cache>.log``
while it runs (the warm-up run's into ``<case>-warmup.log``), its stats JSON beside it, and ``rows.json`` is
rewritten after every row, so a benchmark stopped from outside keeps what it had. ``--run-timeout SECONDS`` stops a
run that takes longer (SIGTERM, then SIGKILL 10 s later) and reports a row saying so; its log is kept.
``--set MODULE.NAME=VALUE`` sets a module attribute in every ``gsmsr infer`` child before its command runs: an
Inductor setting (``torch._inductor.config.triton.autotune_pointwise=False``: no pointwise kernel tuned at its
first call) or one of gsmsr's switches (``gsmsr.archs.swsa.COMPILE_ATTENTION=False``). ``--profile`` runs each child's
main thread under cProfile (``<case>-<cache>.prof`` beside its log) and prints its costliest functions, by cumulative
and by self time: where a phase of the timeline goes in Python (the first compiled graph's one-off seconds, say).
Profiling slows Python-heavy phases, so a profiled run's times compare only with other profiled runs.
``--gpu-waits`` samples each child's main thread and the GPU's queue every 5 ms (``gpu_waits.py``) and prints the
seconds in which the GPU had nothing queued, in the first chunk and after it, by what the host's main thread was
doing then, and the first chunk's timeline (``<case>-<cache>.waits.json`` beside the log).

Start-up depends on the Python installation: where torch has no compiled bytecode and the environment forbids writing
it (``PYTHONDONTWRITEBYTECODE``), every child compiles torch's sources again, seconds of imports and of loading the
first compiled function that no pip-installed system pays; the table's header says when that is the case (run
``python -m compileall`` over site-packages first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import add_set_option, parse_settings, print_table  # noqa: E402  (this folder is on sys.path)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(type='GSMNet', upscale=4, prop_depth=1, attn_depth=1, pa_frame=1, embed_dims=16, num_heads=4)
REFERENCE_SIZE = (20, 180, 320)  # bench_gsm's default row
# `python -c` body of a child with settings (--set), a profile (--profile) or GPU-wait samples (--gpu-waits): argv[1]
# is this folder, argv[2] {dotted name: value} as JSON, argv[3] where to write the main thread's cProfile stats and
# argv[4] the samples of gpu_waits.Sampler ('' for none), the rest gsmsr's
SET_PRELUDE = """import json, sys
sys.path.insert(0, sys.argv[1])
from bench_utils import apply_settings
apply_settings(json.loads(sys.argv[2]))
from gsmsr.cli import main
sampler = None
if sys.argv[4]:
    from gpu_waits import Sampler
    sampler = Sampler(sys.argv[4])
    sampler.start()
prof = None
if sys.argv[3]:
    import cProfile
    prof = cProfile.Profile()
try:
    code = prof.runcall(main, sys.argv[5:]) if prof else main(sys.argv[5:])
finally:
    if prof:
        prof.dump_stats(sys.argv[3])
    if sampler:
        sampler.stop()
sys.exit(code)"""
STOP_GRACE_S = 10.0  # after SIGTERM, a run over --run-timeout gets this long to clean up before SIGKILL


class RunFailed(RuntimeError):
    """A ``gsmsr infer`` run that failed, or was stopped for taking longer than ``--run-timeout``."""

    def __init__(self, message: str, wall: Optional[float] = None) -> None:
        super().__init__(message)
        self.wall = wall  # seconds it ran before it was stopped (None: it exited by itself)


def write_frames(folder: Path, n: int, h: int, w: int) -> None:
    """n PNG frames of a smooth random texture moving 4 px per frame."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    canvas = cv2.GaussianBlur(rng.random((h + 64, w + 64 + 4 * n, 3), dtype=np.float32), (0, 0), 3)
    canvas = cv2.normalize(canvas, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    for t in range(n):
        cv2.imwrite(str(folder / f'{t:08d}.png'), canvas[32 : 32 + h, 4 * t : 4 * t + w])


def write_network(folder: Path, config: str) -> List[str]:
    """A random checkpoint (and options file for the tiny config); returns the infer arguments naming them."""
    import torch
    import yaml

    from gsmsr import GSMNet

    torch.manual_seed(0)
    opts = dict(TINY) if config == 'tiny' else None
    net = GSMNet(**{k: v for k, v in (opts or {}).items() if k != 'type'})
    torch.save({'params': net.state_dict()}, folder / 'net.pth')
    args = ['--weights', str(folder / 'net.pth')]
    if opts is not None:
        (folder / 'net.yml').write_text(yaml.safe_dump({'network_g': opts}))
        args += ['-opt', str(folder / 'net.yml')]
    return args


def child_env(cache_home: Path) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ('TORCHINDUCTOR_CACHE_DIR', 'TRITON_CACHE_DIR')}
    env['XDG_CACHE_HOME'] = str(cache_home)
    env['PYTHONPATH'] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get('PYTHONPATH')])])
    return env


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (gsmsr infer then removes its partial output and exits), SIGKILL if it is still there after the grace."""
    proc.terminate()
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_infer(
    src: Path,
    out: Path,
    net_args: List[str],
    extra: List[str],
    cache_home: Path,
    log: Path,
    timeout: Optional[float] = None,
    settings: Optional[Dict[str, object]] = None,
    profile: Optional[Path] = None,
    waits: Optional[Path] = None,
) -> Tuple[dict, float]:
    """One ``gsmsr infer`` process; returns (stats dict, wall seconds). ``settings``: module attributes set in the
    child before its command runs (``--set``); ``profile``: where the child writes its main thread's cProfile stats;
    ``waits``: where it writes its :class:`gpu_waits.Sampler` samples.

    Its stdout and stderr stream into ``log`` while it runs; its stats are saved beside it (``.json``) and gain
    ``launched_at`` (Unix time of the launch here) and ``first_frame_since_launch``. Raises :class:`RunFailed` when
    it exits with an error, or after stopping it once it has run ``timeout`` seconds.
    """
    stats_file = out.parent / (out.name + '.json')
    stats_file.unlink(missing_ok=True)
    here = str(Path(__file__).resolve().parent)
    launcher = ['-m', 'gsmsr']
    if settings or profile or waits:
        launcher = ['-c', SET_PRELUDE, here, json.dumps(settings or {}), str(profile or ''), str(waits or '')]
    cmd = [sys.executable, *launcher, 'infer', str(src), '-o', str(out), '--force', '--no-progress']
    cmd += [*net_args, '--stats-json', str(stats_file), *extra]
    with open(log, 'w', encoding='utf-8') as f:
        f.write(' '.join(c if c != SET_PRELUDE else '<SET_PRELUDE>' for c in cmd) + '\n')
        f.flush()
        launched = time.time()  # the child reports its phases as Unix times
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=child_env(cache_home), stdout=f, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            wall = time.perf_counter() - start
            f.write(f'\nbench_infer: stopped after {wall:.1f} s (--run-timeout {timeout:g})\n')
            raise RunFailed(f'stopped after {wall:.1f} s: over --run-timeout {timeout:g} s', wall) from None
        wall = time.perf_counter() - start
    if code != 0:
        raise RunFailed(f'gsmsr infer failed ({code}): {log.read_text(errors="replace").strip()[-2000:]}')
    stats = json.loads(stats_file.read_text())
    stats['launched_at'] = launched
    if stats.get('first_frame_at') is not None:
        stats['first_frame_since_launch'] = stats['first_frame_at'] - launched
    log.with_suffix('.json').write_text(json.dumps(stats, indent=1))
    return stats, wall


def phase_rows(stats: dict, wall: float) -> List[Dict[str, str]]:
    """The run's launch timeline: seconds from the launch to each phase and from the phase before, then the end
    of streaming (``stream_start`` + ``seconds``) and the process's exit (launch + wall time); and the process's
    peak host memory so far at the phases that have it (the stats' ``host_peak_at``)."""
    launched = stats['launched_at']
    phases = list((stats.get('timeline') or {}).items())
    if 'stream_start' in dict(phases):
        phases.append(('stream_end', dict(phases)['stream_start'] + stats['seconds']))
    phases.append(('process_exit', launched + wall))
    host = stats.get('host_peak_at') or {}
    rows, before = [], launched
    for phase, at in phases:
        row = {'phase': phase, 'from_launch_s': f'{at - launched:.2f}', 'step_s': f'{at - before:.2f}'}
        if phase in host:
            row['host_peak_GiB'] = f'{host[phase] / 2**30:.2f}'
        rows.append(row)
        before = at
    return rows


def profile_rows(path: Path, key: str, top: int) -> List[Dict[str, str]]:
    """The ``top`` functions of a cProfile stats file by ``key`` ('cumulative': time in the function and what it
    called; 'self': in the function alone), with their calls and both times; file paths from the package folder on."""
    import pstats

    entries = pstats.Stats(str(path)).stats  # (file, line, name) -> (primitive calls, calls, self s, cumulative s, _)
    order = 3 if key == 'cumulative' else 2
    rows = []
    for (file, line, name), v in sorted(entries.items(), key=lambda kv: -kv[1][order])[:top]:
        for marker in ('site-packages/', 'dist-packages/', f'{REPO_ROOT}/'):
            file = file.split(marker, 1)[-1]
        where = name if file == '~' else f'{file}:{line} {name}'
        rows.append({'cumulative_s': f'{v[3]:.2f}', 'self_s': f'{v[2]:.2f}', 'calls': str(v[1]), 'function': where})
    return rows


def compile_phase_rows(stats: dict, top: int = 14) -> List[Dict[str, str]]:
    """The run's costliest compile phases (the stats' ``compile_phases``): calls, total seconds and the seconds of
    the first calls in order (graph by graph: which graph paid for what)."""
    phases = sorted((stats.get('compile_phases') or {}).items(), key=lambda kv: -sum(kv[1]))[:top]
    return [
        {
            'phase': name,
            'calls': str(len(t)),
            'total_s': f'{sum(t):.2f}',
            'first_calls_s': ' '.join(f'{x:.2f}' for x in t[:8]),
        }
        for name, t in phases
    ]


def print_waits(name: str, stats: dict, path: Path) -> None:
    """The GPU's waits for the host in a run (``--gpu-waits``): in the first chunk and after it, by the host's stack,
    and the first chunk's timeline."""
    import gpu_waits

    samples = gpu_waits.load(str(path))
    phases = stats.get('timeline') or {}
    start = phases.get('stream_start')
    if start is None or not samples:
        return
    queued = phases.get('first_chunk_queued', start)
    end = start + stats['seconds']
    for label, t0, t1 in (('in the first chunk', start, queued), ('after the first chunk', queued, end)):
        idle, rows = gpu_waits.idle_by_stack(samples, t0, t1)
        print(
            f"\n# {name}: GPU idle {idle:.2f} s of {t1 - t0:.2f} s {label}, by the host main thread's stack",
            end='',
        )
        if rows:
            print_table(rows, ['idle_s', 'gsmsr_frame', 'innermost_frame'])
    steps = gpu_waits.timeline(samples, start, queued)
    if steps:
        print(f'\n# {name}: the first chunk, per 0.5 s from the start of streaming', end='')
        print_table(steps, ['from_s', 'gpu_idle', 'max_lag_ms', 'host_mostly_in'])
    print()


def save_rows(out_root: Optional[Path], rows: List[Dict[str, str]]) -> None:
    """``rows.json`` as it stands (replaced whole, so a benchmark stopped from outside leaves a readable file)."""
    if out_root is None:
        return
    tmp = out_root / 'rows.json.partial'
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, out_root / 'rows.json')


def network_reference(repeats: int) -> Dict[str, float]:
    """bench_gsm's default row in this process: compiled bf16 streaming GSMNet on a T x 180 x 320 clip."""
    import torch
    from bench_utils import cuda_time

    from gsmsr import GSMNet
    from gsmsr.compile_cache import enable_persistent_caches

    enable_persistent_caches()
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    net = GSMNet(compile_blocks=True).cuda().eval()
    lq = torch.rand(1, *REFERENCE_SIZE[:1], 3, *REFERENCE_SIZE[1:], device='cuda')

    def step():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            return net(lq).float()

    with torch.no_grad():
        ms, _ = cuda_time(step, repeats, warmup=1)
    t, h, w = REFERENCE_SIZE
    return {'ms_per_clip': ms, 'us_per_pixel_frame': 1e3 * ms / (t * h * w)}


def reference_in_subprocess(cache_home: Path, repeats: int) -> Optional[Dict[str, float]]:
    cmd = [sys.executable, str(Path(__file__).resolve()), '--reference-only', '--repeats', str(repeats)]
    proc = subprocess.run(cmd, env=child_env(cache_home), capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
    if proc.returncode != 0 or not lines:
        print(f'reference failed: {proc.stderr.strip()[-1000:]}', flush=True)
        return None
    return json.loads(lines[-1])


def torch_bytecode_cached() -> bool:
    """Whether a child's imports of torch's compiler stack find compiled bytecode (already there, or written by an
    earlier child): the cached file of one large Inductor module stands for the rest."""
    import importlib.util

    spec = importlib.util.find_spec('torch._inductor.scheduler')
    if spec is None or not spec.origin or not spec.cached:
        return True  # nothing to tell (a frozen or zipped installation)
    forbidden = sys.flags.dont_write_bytecode or bool(os.environ.get('PYTHONDONTWRITEBYTECODE'))
    return Path(spec.cached).exists() or not forbidden


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cases', default='360x640x100,1080x1920x40,1080x1920x20', help='comma list of HxWxFRAMES (LR)')
    p.add_argument('--cache', default='fresh,warm', help='fresh, warm or both (fresh first fills the warm cache)')
    p.add_argument('--precision', default=None, help='passed to gsmsr infer (default: its own, bf16 on CUDA)')
    p.add_argument('--cache-dir', help='keep the compile caches here across invocations (default: a temporary one)')
    p.add_argument('--config', choices=['release', 'tiny'], default='release', help='tiny: CPU smoke runs')
    p.add_argument('--no-reference', action='store_true', help='skip the network-only reference row')
    p.add_argument('--repeats', type=int, default=3, help='timed repeats of the network-only reference')
    p.add_argument(
        '--run-timeout',
        type=float,
        metavar='SECONDS',
        help='stop a gsmsr infer run that takes longer and report it in its row, log kept (default: no limit)',
    )
    add_set_option(p, 'in every gsmsr infer child before its command runs')
    p.add_argument(
        '--profile',
        action='store_true',
        help="cProfile each run's main thread: <case>-<cache>.prof beside its log, and its costliest functions printed "
        '(profiled runs are slower: compare their timings only with each other)',
    )
    p.add_argument(
        '--gpu-waits',
        action='store_true',
        help="sample each run's main thread and the GPU's queue (gpu_waits.py): the seconds the GPU waited for the "
        'host in its first chunk and after it, by what the host was doing, and a timeline of the first chunk',
    )
    p.add_argument('--reference-only', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('extra', nargs='*', help='after --: more gsmsr infer arguments, e.g. -- --tile 256')
    args = p.parse_args()
    if args.reference_only:
        print(json.dumps(network_reference(args.repeats)), flush=True)
        return 0
    settings = parse_settings(args.set)
    import torch

    out_root = Path(os.environ['OUT']) / 'bench_infer' if os.environ.get('OUT') else None
    if out_root is not None:
        out_root.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.cache.split(',') if m]
    extra = list(args.extra) + (['--precision', args.precision] if args.precision else [])
    cuda = torch.cuda.is_available()
    rows: List[Dict[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        net_args = write_network(tmp, args.config)
        cache_home = Path(args.cache_dir).resolve() / 'xdg' if args.cache_dir else tmp / 'xdg'
        prefilled = bool(args.cache_dir) and cache_home.is_dir() and any(cache_home.iterdir())
        reference = None
        if cuda and not args.no_reference and args.config == 'release':
            reference = reference_in_subprocess(cache_home, args.repeats)
            print(f'network-only reference: {reference}', flush=True)
        log_root = out_root if out_root is not None else tmp
        for case in args.cases.split(','):
            h, w, n = (int(v) for v in case.split('x'))
            src = tmp / f'in-{case}'
            write_frames(src, n, h, w)
            runs = [(mode, f'{case}-{mode}') for mode in modes]
            if modes[0] == 'warm' and not prefilled:  # a warm-up run fills the cache (a row only if it fails)
                runs.insert(0, ('warmup', f'{case}-warmup'))
            for mode, name in runs:
                if mode == 'fresh':
                    shutil.rmtree(cache_home, ignore_errors=True)
                dest, log = tmp / f'out-{name}', log_root / f'{name}.log'
                try:
                    prof = log.with_suffix('.prof') if args.profile else None
                    waits = log.with_suffix('.waits.json') if args.gpu_waits else None
                    stats, wall = run_infer(
                        src, dest, net_args, extra, cache_home, log, args.run_timeout, settings, prof, waits
                    )
                except RunFailed as err:
                    row = {'input': f'{h}x{w}', 'frames': str(n), 'cache': mode, 'frames/s': str(err)[:80]}
                    if err.wall is not None:
                        row['wall_s'] = f'{err.wall:.1f}'
                    rows.append(row)
                    save_rows(out_root, rows)
                    print(err, flush=True)
                    if mode == 'warmup':  # warm rows without their warm cache would mislead
                        break
                    continue
                print(f'\n# launch timeline of {name} (seconds from launch)', end='')
                print_table(phase_rows(stats, wall), ['phase', 'from_launch_s', 'step_s', 'host_peak_GiB'])
                if stats.get('compile_phases'):
                    print(f'\n# compile phases of {name}', end='')
                    print_table(compile_phase_rows(stats), ['phase', 'calls', 'total_s', 'first_calls_s'])
                if prof is not None:
                    for key, top in (('cumulative', 30), ('self', 20)):
                        print(f'\n# {name}, main thread (cProfile, {prof.name}): by {key} time', end='')
                        print_table(profile_rows(prof, key, top), ['cumulative_s', 'self_s', 'calls', 'function'])
                if waits is not None:
                    print_waits(name, stats, waits)
                sys.stdout.flush()
                if mode == 'warmup':
                    continue
                seconds = stats['seconds']
                first = stats.get('first_frame_since_launch')
                busy = stats.get('gpu_busy_steady')
                aot = stats.get('precompiled_s')
                row = {
                    'input': f'{h}x{w}',
                    'frames': str(n),
                    'cache': mode,
                    'tile': 'x'.join(map(str, stats['tile'])),
                    'batch': str(stats['tile_batch']),
                    'chunk': str(stats.get('chunk', '')),
                    'SWSA': 'chunk' if stats.get('swsa_whole_chunk') else 'slabs',
                    'frames/s': f'{n / seconds:.3f}',
                    'stream_s': f'{seconds:.1f}',
                    'wall_s': f'{wall:.1f}',
                    'first_frame_s': f'{first:.1f}' if first is not None else '',
                    'peak_GPU_GiB': f'{stats["peak_device_bytes"] / 2**30:.2f}' if stats['peak_device_bytes'] else '',
                    'peak_host_GiB': f'{stats["peak_host_bytes"] / 2**30:.2f}',
                    'GPU_busy': f'{100 * busy:.1f}%' if busy is not None else '',
                    'aot_load_s': f'{aot["load"]:.1f}' if aot else '',
                    'aot_compile_s': f'{aot["compile"]:.1f}' if aot else '',
                    'aot_first_call_s': f'{aot["first_call"]:.1f}' if aot else '',
                }
                if reference is not None:
                    net_s = reference['us_per_pixel_frame'] * 1e-6 * n * h * w
                    row.update(net_s=f'{net_s:.1f}', vs_net=f'{seconds / net_s:.2f}')
                rows.append(row)
                save_rows(out_root, rows)
                print(row, flush=True)
            for out in tmp.glob(f'out-{case}*'):  # HR frames of a large case are gigabytes
                if out.is_dir():
                    shutil.rmtree(out, ignore_errors=True)
    device = torch.cuda.get_device_name() if cuda else 'CPU'
    changed = ''.join(f', {k}={v!r}' for k, v in settings.items())
    defaults = ' '.join(extra)
    print(f'\n# {device}, torch {torch.__version__}, {args.config} config{changed}, gsmsr infer defaults {defaults}')
    if not torch_bytecode_cached():
        print('# torch has no compiled bytecode here and none is written: each run compiled its sources at start-up')
    if reference is not None:
        print(
            f'# network only (compiled bf16, {"x".join(map(str, REFERENCE_SIZE))}): '
            f'{reference["us_per_pixel_frame"]:.2f} us per LR pixel-frame'
        )
    cols = ['input', 'frames', 'cache', 'tile', 'batch', 'chunk', 'SWSA', 'frames/s', 'stream_s', 'wall_s']
    cols += ['first_frame_s', 'peak_GPU_GiB', 'peak_host_GiB', 'GPU_busy', 'aot_load_s', 'aot_compile_s']
    cols += ['aot_first_call_s', 'net_s', 'vs_net']
    print_table(rows, cols)
    return 0


if __name__ == '__main__':
    sys.exit(main())
