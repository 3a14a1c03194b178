"""The built wheel holds what an installed user needs, and works installed (not editable) in a fresh venv.

The wheel is built from a copy of the build's inputs (the root files and ``gsmsr/``), so the checkout gets no
``build/`` or ``*.egg-info`` and a stale ``build/lib`` can not hide a file the wheel misses. The venv sees the
current environment's packages (torch, basicsr, ...) but gets its own, non-editable gsmsr from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO_ROOT / 'gsmsr'
META_INFO = 'gsmsr/data/meta_info'
SKIPPED = shutil.ignore_patterns('__pycache__', '*.pyc', '*.pyo', '*.egg-info')


def _env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME', 'PYTHONSTARTUP')}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK='1', PIP_NO_INPUT='1', PYTHONNOUSERSITE='1')
    return env


def _run(cmd: List[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f'{" ".join(map(str, cmd))} exited {result.returncode}\n'
        f'--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}'
    )
    return result


def _package_files() -> List[str]:
    """Every file of the package directory (modules and data), as wheel paths: all must ship."""
    files = []
    for path in sorted(PACKAGE_DIR.rglob('*')):
        rel = path.relative_to(REPO_ROOT)
        if path.is_file() and '__pycache__' not in rel.parts and path.suffix not in ('.pyc', '.pyo'):
            files.append(rel.as_posix())
    return files


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp('packaging')
    src = tmp / 'src'
    src.mkdir()
    for path in REPO_ROOT.iterdir():  # what setup.py reads: the root files and the package
        if path.is_file():
            shutil.copy2(path, src / path.name)
    shutil.copytree(PACKAGE_DIR, src / 'gsmsr', ignore=SKIPPED)
    out = tmp / 'wheelhouse'
    _run([sys.executable, '-m', 'pip', 'wheel', '.', '--no-deps', '--no-build-isolation', '-w', out], cwd=src)
    wheels = sorted(out.glob('gsmsr-*.whl'))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        top_level = {name.split('/')[0] for name in names}
        assert top_level == {'gsmsr', next(t for t in top_level if t.endswith('.dist-info'))}, top_level
        expected = _package_files()
        assert any(f.startswith(META_INFO + '/') for f in expected)
        missing = [f for f in expected if f not in names]
        assert not missing, f'files of gsmsr/ missing from the wheel (setup.py package_data?): {missing}'
        for f in expected:
            if f.startswith(META_INFO + '/'):
                assert zf.read(f) == (REPO_ROOT / f).read_bytes(), f
        dist_info = next(t for t in top_level if t.endswith('.dist-info'))
        entry_points = zf.read(f'{dist_info}/entry_points.txt').decode()
    assert 'gsmsr = gsmsr.cli:main' in entry_points
    assert 'basicsr = gsmsr.cli:basicsr_main' in entry_points


INSTALLED_CHECK = """
import json
import gsmsr
from gsmsr import train
from gsmsr.data import make_lmdb
opt = {'datasets': {'test': {'meta_info_file': 'gsmsr/data/meta_info/meta_info_REDS4_test_GT.txt'}}}
train.resolve_package_paths(opt)
print(json.dumps({'gsmsr': gsmsr.__file__, 'meta_info_dir': make_lmdb.META_INFO_DIR,
                  'resolved': opt['datasets']['test']['meta_info_file']}))
"""


def test_installed_wheel_runs_in_fresh_venv(wheel, tmp_path):
    venv = tmp_path / 'venv'
    # No pip of its own (faster): the current environment's pip, seen through the system site, installs into it.
    _run([sys.executable, '-m', 'venv', '--system-site-packages', '--without-pip', venv], cwd=tmp_path)
    bindir = venv / ('Scripts' if os.name == 'nt' else 'bin')
    python = bindir / ('python.exe' if os.name == 'nt' else 'python')
    purelib = Path(
        _run([python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'], cwd=tmp_path).stdout.strip()
    )
    # --system-site-packages gives the base interpreter's packages; when this runs inside a venv, add its
    # site-packages too (after the new venv's own, so the wheel's gsmsr still comes first).
    dirs = [d for d in site.getsitepackages() if Path(d).resolve() != purelib.resolve()]
    (purelib / '_outer_env.pth').write_text(''.join(f'import site; site.addsitedir({d!r})\n' for d in dirs))
    _run([python, '-m', 'pip', 'install', '--no-deps', '--no-index', '--ignore-installed', wheel], cwd=tmp_path)

    cwd = tmp_path / 'elsewhere'  # not the checkout, so '' on sys.path can not find it
    cwd.mkdir()
    info = json.loads(_run([python, '-c', INSTALLED_CHECK], cwd=cwd).stdout.strip().splitlines()[-1])
    package = purelib / 'gsmsr'
    assert Path(info['gsmsr']).resolve() == (package / '__init__.py').resolve(), info
    assert Path(info['meta_info_dir']).resolve() == (package / 'data' / 'meta_info').resolve(), info
    resolved = Path(info['resolved'])
    assert resolved.is_file() and resolved.resolve().is_relative_to(package.resolve()), info

    for command in ('gsmsr', 'basicsr'):
        script = shutil.which(command, path=str(bindir))
        assert script, f'console script {command} not installed in {bindir}'
        result = _run([script, '--help'], cwd=cwd)
        assert f'usage: {command}' in result.stdout, result.stdout
