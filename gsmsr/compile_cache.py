"""Compilation paid once per machine: persistent ``torch.compile`` caches and a Mega-Cache file.

* :func:`enable_persistent_caches` points Inductor's cache (which also holds Triton's, unless ``TRITON_CACHE_DIR``
  is set) at a per-user folder, ``$XDG_CACHE_HOME/gsmsr`` (default ``~/.cache/gsmsr``), instead of the system
  temporary folder, which is emptied at reboot or per container; and turns the FX-graph and AOTAutograd caches on.
  Variables the user set are left alone. Dynamo still traces in every process; what the caches save is
  Inductor's code generation, Triton compilation and autotuning (FAST_KERNELS.md §D).
* :class:`MegaCache` saves ``torch.compiler.save_cache_artifacts()`` to one file per software and GPU
  combination (:func:`cache_key`: torch, Triton, CUDA, GPU name and compute capability, gsmsr), written
  atomically, and loads it into the caches at start. Those artifacts are portable between machines of the same
  combination, so the file can be copied along with the weights.

* :class:`DoneMarker` remembers that a one-off step, such as compiling the kernels of one input shape ahead of the
  first chunk, was done on this machine, so that later processes skip it.

* :class:`PrecompiledFunction` (``gsmsr infer``'s compiled blocks, unless ``GSMSR_AOT=0``) goes further: it keeps a
  function compiled ahead of time (``torch.compile(fn, fullgraph=True).aot_compile``, torch >= 2.10) in a file keyed
  by the software, gsmsr's sources and the inputs, so that a later process loads it instead of tracing it: it skips
  Dynamo and AOTAutograd as well. On CUDA the Triton kernels' binaries come from Triton's cache (an H200 process loads
  the release network's blocks in ~2.5 s; one kernel was seen compiling again there, ~0.5 s); on CPU the file
  carries only the C++ kernels' source, so a load there compiles them again unless Inductor's cache still holds
  them.

Used by ``gsmsr infer``; the functions are independent of it (tests and training can call them too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from gsmsr.faults import one_line
from gsmsr.utils import atomic_write_bytes

__all__ = [
    'cache_root',
    'enable_persistent_caches',
    'cache_key',
    'MegaCache',
    'DoneMarker',
    'PrecompiledFunction',
    'aot_supported',
]

# environment variable -> sub-folder of the cache root
_CACHE_DIRS = {'TORCHINDUCTOR_CACHE_DIR': 'inductor', 'TRITON_CACHE_DIR': 'triton'}


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/gsmsr``, or ``~/.cache/gsmsr``."""
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'gsmsr'


def enable_persistent_caches(root: Optional[Path] = None) -> Path:
    """Persistent Inductor/Triton cache folders under ``root`` (default :func:`cache_root`) where the user set
    none, and the FX-graph and AOTAutograd caches on unless the environment says otherwise. Returns ``root``.

    Call it before the first compilation of the process (Inductor reads the folders when it first needs them).
    A user-set ``TORCHINDUCTOR_CACHE_DIR`` alone keeps Triton's cache inside it, as Inductor does by default.
    Torch's own default folder there does not count as the user's: importing ``torch._dynamo`` writes it into the
    environment, so without this exception the folders under ``root`` would never be used.
    Where ``root`` cannot be created (a read-only home), Inductor's defaults stay.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    root = Path(root) if root is not None else cache_root()
    if _inductor_dir_is_torch_default():
        del os.environ['TORCHINDUCTOR_CACHE_DIR']
    if 'TORCHINDUCTOR_CACHE_DIR' not in os.environ:
        try:
            for var, sub in _CACHE_DIRS.items():
                if var not in os.environ:
                    (root / sub).mkdir(parents=True, exist_ok=True)
                    os.environ[var] = str(root / sub)
        except OSError:
            pass
    if os.environ.get('TORCHINDUCTOR_FX_GRAPH_CACHE') is None:
        inductor_config.fx_graph_cache = True
    if os.environ.get('TORCHINDUCTOR_AUTOGRAD_CACHE') is None:
        functorch_config.enable_autograd_cache = True
    return root


def _inductor_dir_is_torch_default() -> bool:
    """Whether ``TORCHINDUCTOR_CACHE_DIR`` holds torch's own default (a folder in the system temporary folder):
    importing ``torch._dynamo`` writes that default into the environment (torch 2.11 and 2.14 do), so its presence
    does not mean that the user chose a folder."""
    value = os.environ.get('TORCHINDUCTOR_CACHE_DIR')
    if not value:
        return False
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return os.path.abspath(value) == os.path.abspath(default_cache_dir())
    except Exception:  # another torch layout: treat the value as the user's
        return False


def cache_key(device: torch.device) -> Dict[str, Optional[str]]:
    """What compiled artifacts depend on: torch, Triton and CUDA versions, the GPU, and gsmsr's version."""
    import gsmsr

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = capability = None
    if device.type == 'cuda':
        gpu = torch.cuda.get_device_name(device)
        capability = '.'.join(map(str, torch.cuda.get_device_capability(device)))
    return {
        'torch': torch.__version__,
        'triton': triton_version,
        'cuda': torch.version.cuda,
        'gpu': gpu,
        'capability': capability,
        'gsmsr': gsmsr.__version__,
    }


def _key_file_stem(key: Dict[str, object]) -> str:
    """'<GPU>-torch<version>-<digest of the whole key>': readable, and unique per key."""
    software = key.get('software', key)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    readable = re.sub(r'[^A-Za-z0-9.]+', '-', f'{software.get("gpu") or "cpu"}-torch{software.get("torch")}')
    return f'{readable.strip("-")}-{digest}'


def _key_file_name(key: Dict[str, Optional[str]]) -> str:
    return f'{_key_file_stem(key)}.megacache'


class MegaCache:
    """One Mega-Cache file: :meth:`load` its artifacts into the compile caches, :meth:`save` the process's.

    ``save_artifacts`` / ``load_artifacts`` default to ``torch.compiler.save_cache_artifacts`` /
    ``load_cache_artifacts`` (replaceable for tests). A file that cannot be read or loaded is ignored and a
    failed save only warns: a broken cache must never stop inference, it only costs a compilation.
    """

    def __init__(
        self,
        path: Path,
        save_artifacts: Optional[Callable[[], Optional[Tuple[bytes, object]]]] = None,
        load_artifacts: Optional[Callable[[bytes], object]] = None,
    ) -> None:
        self.path = Path(path)
        self._save_artifacts = save_artifacts or torch.compiler.save_cache_artifacts
        self._load_artifacts = load_artifacts or torch.compiler.load_cache_artifacts
        self._digest: Optional[str] = None  # of the bytes on disk, so an unchanged cache is not rewritten

    @classmethod
    def for_device(cls, device: torch.device, root: Optional[Path] = None) -> MegaCache:
        """The file for this software and GPU combination under ``root`` (default :func:`cache_root`)."""
        root = Path(root) if root is not None else cache_root()
        return cls(root / 'megacache' / _key_file_name(cache_key(device)))

    def load(self) -> bool:
        """Load the file's artifacts into the compile caches; False when there is none or it is unusable."""
        try:
            data = self.path.read_bytes()
        except OSError:
            return False
        try:
            self._load_artifacts(data)
        except Exception:  # written by an incompatible build or corrupt: recompile instead
            return False
        self._digest = hashlib.sha256(data).hexdigest()
        return True

    def save(self) -> bool:
        """Write this process's artifacts (atomically) if there are any and they differ from the file's."""
        try:
            result = self._save_artifacts()
            if not result or not result[0]:
                return False
            data = result[0]
            digest = hashlib.sha256(data).hexdigest()
            if digest == self._digest:
                return False
            atomic_write_bytes(self.path, data)
        except Exception as e:  # full disk, read-only home, an artifact torch cannot serialise
            print(f'warning: compile cache not saved to {self.path}: {one_line(e, 200)}', file=sys.stderr)
            return False
        self._digest = digest
        return True


class DoneMarker:
    """An empty file under the cache root that says a process on this machine finished a one-off step (compiling
    the kernels of one input shape, say) for ``key``, together with this software, gsmsr's sources and the compile
    cache folders in use, so that later processes may skip the step. Only a hint: where the caches were emptied since,
    the work skipped is done later anyway (a kernel compiles at its first launch), so a wrong marker costs time, never
    a result. Writing is atomic; a folder that cannot be written only leaves the step to be done again."""

    def __init__(self, name: str, key: Dict[str, object], device: torch.device, root: Optional[Path] = None) -> None:
        full = {
            'marker': name,
            'key': key,
            'software': cache_key(device),
            'sources': source_digest(),
            'caches': {var: os.environ.get(var) for var in _CACHE_DIRS},
        }
        root = Path(root) if root is not None else cache_root()
        self.path = root / 'done' / f'{name}-{_key_file_stem(full)}'

    def exists(self) -> bool:
        return self.path.is_file()

    def set(self) -> None:
        if self.exists():
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, b'')
        except OSError:
            pass


# -- ahead-of-time compiled functions ------------------------------------------------------------------------------

AOT_MAGIC = b'gsmsr-aot 1\n'
AOT_ENV = 'GSMSR_AOT'  # '0': gsmsr infer does not keep GSMNet's compiled blocks as precompiled functions
AOT_BACKEND = 'inductor'  # torch.compile backend of precompiled functions (tests use 'aot_eager', which is faster)
# Inductor's options for GSMNet's compiled blocks. Pointwise autotuning off: it cost nothing warm (bench_gsm, 20 x 180
# x 320, bf16: 41.0 against 41.1 ms/frame, H200, 2026-12-03) and took 4.9 s of an empty cache's first calls at 360 x
# 640 (gsmsr infer), more on larger frames, where each candidate configuration is timed on larger tensors.
INDUCTOR_OPTIONS: Dict[str, object] = {'triton.autotune_pointwise': False}
_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(f'warning: {message}', file=sys.stderr)


def aot_supported() -> bool:
    """Whether this torch has ``torch.compile(...).aot_compile`` and ``torch.compiler.load_compiled_function``:
    torch 2.9 and later, though 2.9 cannot serialise Inductor's output (its ``aot_compile`` then fails, which
    :class:`PrecompiledFunction` takes as a fallback). Before 2.13 (2.12 not checked) the method exists only while
    ``torch._dynamo.config.enable_aot_compile`` is on, which :class:`PrecompiledFunction` sets while it compiles."""
    try:
        from torch._dynamo.aot_compile import AOTCompiledFunction  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch.compiler, 'load_compiled_function') and hasattr(torch._dynamo.config, 'enable_aot_compile')


def _package_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


_SOURCE_DIGEST: Optional[str] = None


def source_digest() -> str:
    """Digest of gsmsr's network and operator sources (``gsmsr/archs``, ``gsmsr/ops``): a precompiled function
    is the traced code, so an edit there must not reuse it, even at the same gsmsr version."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        package = Path(__file__).resolve().parent
        h = hashlib.sha256()
        for path in sorted([*package.glob('archs/*.py'), *package.glob('ops/*.py')]):
            h.update(path.relative_to(package).as_posix().encode() + b'\0' + path.read_bytes() + b'\0')
        _SOURCE_DIGEST = h.hexdigest()[:16]
    return _SOURCE_DIGEST


class _Unsupported(Exception):
    """An argument a precompiled function cannot be keyed on (a Python function, say)."""


def _simple(v: object) -> bool:
    if isinstance(v, (tuple, list)):
        return all(_simple(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str))


def module_config(m: torch.nn.Module) -> list:
    """Everything of a module a traced graph can depend on, except parameter values (graph inputs): each
    submodule's class and plain attributes, and the shape, dtype and device of every parameter and buffer."""
    config: list = []
    for name, sub in m.named_modules():
        attrs = {k: v for k, v in sorted(vars(sub).items()) if not k.startswith('_') and _simple(v)}
        config.append([name, f'{type(sub).__module__}.{type(sub).__qualname__}', repr(attrs)])
    for name, t in [*m.named_parameters(), *m.named_buffers()]:
        config.append([name, list(t.shape), str(t.dtype), str(t.device), t.requires_grad])
    return config


def describe_inputs(args: tuple, kwargs: dict) -> list:
    """What a compiled graph is specialised on, from its arguments: tensor shapes, strides, dtypes and devices,
    where None stands, plain values, and modules by :func:`module_config`. Raises :class:`_Unsupported` for other
    objects."""

    def describe(v: object) -> object:
        if isinstance(v, torch.Tensor):
            return ['tensor', list(v.shape), list(v.stride()), str(v.dtype), str(v.device), v.requires_grad]
        if isinstance(v, torch.nn.Module):
            return ['module', module_config(v)]
        if isinstance(v, (list, tuple)):
            return [type(v).__name__, [describe(x) for x in v]]
        if isinstance(v, dict) and all(isinstance(k, str) for k in v):
            return ['dict', [[k, describe(x)] for k, x in sorted(v.items())]]
        if _simple(v):
            return v
        raise _Unsupported(f'cannot key a precompiled function on a {type(v).__name__}')

    return [describe(list(args)), describe(kwargs)]


def _ambient_state(device: torch.device) -> list:
    """Grad mode and autocast state on the inputs' device (Dynamo guards on both)."""
    kind = device.type
    autocast = torch.is_autocast_enabled(kind) if kind in ('cuda', 'cpu') else False
    return [torch.is_grad_enabled(), autocast, str(torch.get_autocast_dtype(kind)) if autocast else None]


def _first_device(v: object) -> Optional[torch.device]:
    if isinstance(v, torch.Tensor):
        return v.device
    if isinstance(v, (list, tuple)):
        v = list(v)
    elif isinstance(v, dict):
        v = list(v.values())
    else:
        return None
    for x in v:
        d = _first_device(x)
        if d is not None:
            return d
    return None


@dataclasses.dataclass
class _Entry:
    fn: Callable
    switches: object


class PrecompiledFunction:
    """``fn`` compiled ahead of time (``torch.compile(fn, fullgraph=True).aot_compile``) and kept on disk, so that a
    later process loads it instead of tracing it again: it skips Dynamo and AOTAutograd, not only Inductor.

    ``fn`` takes the module as an argument (``GSMBlock.forward`` with the block first, say): parameters are graph
    inputs, not constants, so one compiled function serves every module of that kind and configuration. A call runs
    the first loaded function whose guards accept the arguments; otherwise it loads the file for the arguments' key
    (software as in :func:`cache_key`, Python, :func:`source_digest`, ``switches()``, :func:`describe_inputs`,
    grad and autocast state) from ``folder``, or compiles and saves one there (atomically). Inference has fixed
    shapes, so that happens once per input size.

    ``switches`` returns module-level settings the traced code reads: the saved guards leave globals out, so they
    must be part of the key. Fallbacks, each with a warning: a file that cannot be read, is from another build or
    whose guards reject the inputs is compiled again and replaced; where ahead-of-time compilation is missing or
    fails (arguments it cannot key on, a graph break, an artifact torch cannot serialise), the function falls back
    to an ordinary ``torch.compile(fn, dynamic=False)`` for good; a failed save only costs the next process a
    compilation.
    """

    def __init__(
        self,
        fn: Callable,
        folder: Union[str, os.PathLike],
        switches: Optional[Callable[[], object]] = None,
        backend: Optional[str] = None,
    ) -> None:
        self.fn = fn
        self.backend = backend or AOT_BACKEND
        self.options = INDUCTOR_OPTIONS if self.backend == 'inductor' else None  # only Inductor takes them
        self.name = f'{fn.__module__}.{fn.__qualname__}'
        self.folder = Path(folder)
        self.switches = switches or (lambda: None)
        self.entries: List[_Entry] = []
        self._fallback: Optional[Callable] = None
        self.events: List[str] = []  # what happened, in order ('loaded X in 0.1 s', 'compiled in ...', 'saved X',
        # 'fallback: why'): for logs and tests
        # spent loading files, compiling, and in the first call of each function obtained (start-up reports)
        self.seconds = {'load': 0.0, 'compile': 0.0, 'first_call': 0.0}

    def __call__(self, *args, **kwargs):
        if self._fallback is not None:
            return self._fallback(*args, **kwargs)
        switches = self.switches()
        for entry in self.entries:
            if entry.switches == switches and entry.fn.guard_check(*args, **kwargs):
                return entry.fn(*args, **kwargs)
        try:
            entry = _Entry(self._obtain(args, kwargs, switches), switches)
        except _Fallback as e:
            _warn_once(f'{self.name}: {e}', f'{self.name}: {e}; using torch.compile')
            self.events.append(f'fallback: {e}')
            self._fallback = torch.compile(self.fn, dynamic=False, backend=self.backend, options=self.options)
            return self._fallback(*args, **kwargs)
        self.entries.append(entry)
        # The first call of a compiled or loaded function may still build or load its kernels (host time: the GPU
        # work it queues is not waited for), start-up that belongs with the load and compile seconds.
        start = time.perf_counter()
        out = entry.fn(*args, **kwargs)
        self.seconds['first_call'] += time.perf_counter() - start
        return out

    def __reduce__(self):
        # Saving a compiled function's guards pickles the modules among its inputs, their callables included, and a
        # module routed through this object holds it (GSMNet sets ``block.forward``): pickle a stand-in, not the
        # loaded functions. The saved guards never call it.
        return _detached, (self.name,)

    def __deepcopy__(self, memo: dict) -> PrecompiledFunction:
        return self  # holds no module: copies of a network can share it

    # -- keys and files -------------------------------------------------------------------------------------------
    def key(self, args: tuple, kwargs: dict, switches: object) -> Dict[str, object]:
        device = _first_device([args, kwargs]) or torch.device('cpu')
        return {
            'format': 1,
            'function': self.name,
            'backend': self.backend,
            'options': self.options,
            'software': {
                **cache_key(device),
                'python': sys.version.split()[0],
                'basicsr': _package_version('basicsr'),
                'sources': source_digest(),
            },
            'switches': repr(switches),
            'state': _ambient_state(device),
            'inputs': describe_inputs(args, kwargs),
        }

    def path(self, key: Dict[str, object]) -> Path:
        return self.folder / f'{self.fn.__qualname__}-{_key_file_stem(key)}.aot'

    # -- load, or compile and save --------------------------------------------------------------------------------
    def _obtain(self, args: tuple, kwargs: dict, switches: object) -> Callable:
        if not aot_supported():
            raise _Fallback(f'torch {torch.__version__} has no ahead-of-time compilation')
        try:
            key = self.key(args, kwargs, switches)
        except _Unsupported as e:
            raise _Fallback(str(e)) from None
        path = self.path(key)
        fn = self._load(path, key, args, kwargs)
        if fn is None:
            fn = self._compile(args, kwargs)
            if not fn.guard_check(*args, **kwargs):  # never seen; would otherwise recompile at every call
                raise _Fallback('the guards of a fresh compilation reject its own inputs')
            self._save(fn, path, key)
        fn.disable_guard_check()  # __call__ checks the guards itself, once
        return fn

    def _load(self, path: Path, key: Dict[str, object], args: tuple, kwargs: dict) -> Optional[Callable]:
        start = time.perf_counter()
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            head, header, payload = data.split(b'\n', 2)
            if head + b'\n' != AOT_MAGIC:
                raise ValueError('not a gsmsr precompiled function')
            if json.loads(header) != json.loads(json.dumps(key)):
                raise ValueError('written for other software or inputs')
            fn = torch.compiler.load_compiled_function(io.BytesIO(payload))
            if not fn.guard_check(*args, **kwargs):
                raise ValueError('its guards reject these inputs')
        except Exception as e:  # corrupt, another torch, unloadable: compile again and replace it
            _warn_once(str(path), f'precompiled function {path} not used ({one_line(e, 200)}); compiling it again')
            return None
        seconds = time.perf_counter() - start
        self.seconds['load'] += seconds
        self.events.append(f'loaded {path.name} in {seconds:.2f} s')
        return fn

    def _compile(self, args: tuple, kwargs: dict) -> Callable:
        import torch._dynamo

        start = time.perf_counter()
        try:
            with torch._dynamo.config.patch(enable_aot_compile=True):  # off by default in torch 2.9 to 2.11
                compiled = torch.compile(
                    self.fn, fullgraph=True, dynamic=False, backend=self.backend, options=self.options
                )
                fn = compiled.aot_compile((args, kwargs))
        except Exception as e:
            raise _Fallback(f'ahead-of-time compilation failed: {one_line(e, 300)}') from None
        seconds = time.perf_counter() - start
        self.seconds['compile'] += seconds
        self.events.append(f'compiled in {seconds:.2f} s')
        return fn

    def _save(self, fn: Callable, path: Path, key: Dict[str, object]) -> None:
        from torch._dynamo.aot_compile import AOTCompiledFunction

        try:
            payload = AOTCompiledFunction.serialize(fn).serialized_data
            header = json.dumps(key, sort_keys=True).encode()
            atomic_write_bytes(path, AOT_MAGIC + header + b'\n' + payload)
        except Exception as e:  # full disk, read-only folder, an object torch cannot serialise
            _warn_once(str(path), f'precompiled function not saved to {path}: {one_line(e, 300)}')
            return
        self.events.append(f'saved {path.name}')


def _detached(name: str) -> Callable:
    """What a pickled :class:`PrecompiledFunction` becomes."""

    def detached(*args, **kwargs):
        raise RuntimeError(f'{name}: a precompiled function restored from a pickle cannot run')

    return detached


class _Fallback(Exception):
    """Ahead-of-time compilation does not apply: use torch.compile."""
