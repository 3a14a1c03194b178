"""Compile the depthwise 3x3x3 stencil of gsmsr/ops/dwconv3d.py offline for sm_90a (no GPU needed) and estimate
what bounds one call: instructions by kind, pipes, L1 wavefronts, L2 and DRAM bytes, latency.

    python benchmarks/sass_stencil.py [VARIANT ...] [--shape 1,5,180,320,768] [--mode gelu] [--dtype bf16]
        [--module gsmsr.ops.dwconv3d | path/to/copy.py] [--keep DIR]

A VARIANT is ``default`` (the module's DEFAULT_CONFIG; also ``fast`` in a copy of an older module that has a
FAST_CONFIG), optionally followed by ``,field=value`` overrides of ``DWConvConfig`` fields, e.g.
``default,block_c=64,num_warps=4`` or ``default,bf16_pairs=0``; the module's ``stencil_launch`` names the kernel.
It is specialised as Triton's launcher specialises the real call (16-byte aligned pointers,
integers divisible by 16 marked so), with the grid, arguments and constexprs of ``stencil_launch``; x, g and y in
``--dtype``, taps and bias fp32, bias on.

Counting. SASS loops (backward branches) are paired in pre-order with the TTGIR's ``scf.for`` loops, whose trip
counts come from their bounds (constants or kernel arguments). One program's instruction trace follows the SASS:
a loop runs its trip count; a predicated forward branch is taken only where that is the way to the loop nest
being traced (the K <= 0 guard, the interior / edge split), so code under a runtime ``if`` counts every time
(the stencil's skipped epilogue of frame -1, one of K + 1, is therefore counted). Predicated-off
instructions still take an issue slot. A kernel with an interior and an edge copy of its frame loop is traced
both ways and weighted by the share of interior programs. Per variant it prints:

* ptxas registers, stack and spill bytes; the programs an SM holds (65536 registers allocated 8 a thread at a
  time, 64 warps, 32 programs), the warps a sub-partition holds, and the waves of the grid;
* the TTGIR layouts (sizePerThread / threadsPerWarp) of the x loads, the tap-weight loads and the y store, and the
  SASS load / store widths;
* SASS instructions by kind for one warp and one iteration of the frame loop (its inner loops, with prologue and
  tail spread over the K frames), and in brackets thread instructions per output element (a 3x3x3 tap sum needs
  27 FFMA);
* issue cycles on a sub-partition per pipe, with sass_scan's rates (FP32 1 cycle a warp instruction, IMAD and
  integer / move / conversion 2, MUFU 8; one instruction issued a cycle);
* L1 wavefronts from the TTGIR accesses: a warp instruction touches one 128-byte line per distinct pixel row and
  per 128 bytes of channels (a pixel's channels are C * 2 bytes apart, so rows never share lines);
* floors for the whole call on an H200 (132 SMs at 1.98 GHz): (a) issue and each pipe, (b) L1 at one wavefront a
  clock an SM, (c) DRAM (x and y once, g too in the gradient mode) at 4.8 TB/s; also L2 -> SM bytes (each program
  reads its tile and halo from L2 every frame: neighbouring programs do not share an L1) at an assumed 5.5 TB/s,
  and latency: every warp of a wave takes at least sass_scan's one-warp in-order time over the trace, with loads
  hitting L1 (35 cycles). The same with every load waiting for L2 (300 cycles) is printed apart, as an upper
  estimate of what latency can add when few warps hide it (most shifted loads hit L1).

Needs Triton with its bundled CUDA tools (ptxas, cuobjdump); torch only for placeholder tensors. About 10 s a
variant on a CPU (20 s with an interior / edge split).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sass_scan as scan  # noqa: E402  (this folder is on sys.path)
import triton  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

CLOCK_GHZ = 1.98  # H200 boost clock
HBM_TBPS = 4.8
L2_TBPS = 5.5  # assumed L2 -> SM bandwidth (H100 microbenchmarks); not a datasheet number
LINE = 128  # bytes of an L1 line / wavefront
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_PROGRAMS_PER_SM = 65536, 64, 32
MODES = {'conv': 0, 'gelu': 1, 'gelu_grad': 2}
LOAD_LATENCY = {'L1': 35, 'L2': 300}
Loop = Tuple[int, int]  # (first, last) instruction address of a SASS loop body


@dataclasses.dataclass
class Access:
    """One tt.load / tt.store of the TTGIR: what it moves and how often one program executes it."""

    kind: str  # 'load' or 'store'
    shape: Tuple[int, ...]
    elem_bytes: int
    layout: Tuple[str, List[int], List[int], List[int]]  # (sliced dim or '', sizePerThread, threadsPerWarp, warps)
    count: int  # executions per program

    def describe(self) -> str:
        dim, spt, tpw, _ = self.layout
        return f'{spt} / {tpw}' + (f' (slice {dim})' if dim else '')


# ---------------------------------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------------------------------


def parse_variant(text: str, mod) -> Tuple[str, object]:
    """(label, DWConvConfig) from ``default`` (or an older module's ``fast``) plus ``,field=value`` overrides."""
    base, *overrides = text.split(',')
    presets = {'default': mod.DEFAULT_CONFIG, 'fast': getattr(mod, 'FAST_CONFIG', None)}
    if presets.get(base) is None:
        raise SystemExit(f'bad variant {text!r}: start with one of {[k for k, v in presets.items() if v]}')
    fields = {f.name: f.type for f in dataclasses.fields(presets[base])}
    changes = {}
    for item in overrides:
        key, _, value = item.partition('=')
        if key not in fields:
            raise SystemExit(f'bad variant {text!r}: DWConvConfig has no field {key!r}')
        changes[key] = bool(int(value)) if fields[key] in (bool, 'bool') else int(value)
    return text, dataclasses.replace(presets[base], **changes)


def compile_stencil(mod, cfg, shape: Sequence[int], mode: int, dtype: torch.dtype):
    """(compiled kernel, grid, integer arguments by name) for the real call, specialised by Triton's own launcher."""
    name, grid, ints, kwargs = mod.stencil_launch(tuple(shape), dtype, mode, True, cfg)
    fn = getattr(mod._KERNELS(False), name).jit
    backend = make_backend(scan.TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    act = lambda: torch.empty(16, dtype=dtype)  # noqa: E731  (placeholders: dtype and alignment only)
    f32 = lambda: torch.empty(16, dtype=torch.float32)  # noqa: E731
    bound, specialization, options = binder(act(), f32(), f32(), act(), act(), *ints, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=scan.TARGET, options=options.__dict__)
    names = [p.name for p in fn.params][5 : 5 + len(ints)]
    return compiled, grid, dict(zip(names, ints))


# ---------------------------------------------------------------------------------------------------------------
# TTGIR: loop trip counts, layouts, accesses
# ---------------------------------------------------------------------------------------------------------------


def ttgir_loops(ttgir: str, args: Dict[str, int]) -> Tuple[List[int], List[int]]:
    """(trip count, depth) of every scf.for in textual order; bounds must be constants or kernel arguments."""
    consts = {m.group(1): int(m.group(2)) for m in re.finditer(r'%(\w+) = arith\.constant (-?\d+) : i\d+', ttgir)}
    values = {**consts, **args}
    trips, depths, stack = [], [], []
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith('}'):
            stack.pop()
        m = re.search(r'scf\.for %\w+ = %(\w+) to %(\w+) step %(\w+)', text)
        if m:
            try:
                lo, hi, step = (values[name] for name in m.groups())
            except KeyError as e:
                raise ValueError(f'loop bound {e} is neither a constant nor a kernel argument: {text[:120]}') from None
            trips.append(max(0, -(-(hi - lo) // step)))
            depths.append(1 + stack.count('for'))
        if text.endswith('{'):
            stack.append('for' if m else 'region')
    return trips, depths


def _layouts(ttgir: str) -> Dict[str, Tuple[List[int], List[int], List[int]]]:
    lists = r'sizePerThread = \[([\d, ]+)\], threadsPerWarp = \[([\d, ]+)\], warpsPerCTA = \[([\d, ]+)\]'
    pat = r'^#(\w+) = #ttg\.blocked<\{' + lists
    ints = lambda s: [int(v) for v in s.split(',')]  # noqa: E731
    return {m[0]: (ints(m[1]), ints(m[2]), ints(m[3])) for m in re.findall(pat, ttgir, re.M)}


def ttgir_accesses(ttgir: str, trips: List[int], interior: float) -> List[Access]:
    """Every tt.load / tt.store with its tensor type, layout and executions per program: the product of the trip
    counts of the scf.for loops around it and, inside an scf.if with an else, the share of programs taking that
    branch. A kernel's runtime if / else is its interior / edge split: the branch with fewer masked loads is the
    interior one, taken by ``interior`` of the programs."""
    layouts = _layouts(ttgir)
    tensor = r'tensor<([\dx]+)x!tt\.ptr<(\w+)>, (#\w+|#ttg\.slice<\{dim = (\d), parent = #(\w+)\}>)>'
    found: List[Tuple[Access, Tuple[Tuple[int, int], ...], bool]] = []
    stack: List[Tuple[str, int]] = []
    n_loops = n_ifs = 0
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith('}'):
            kind, index = stack.pop()
            if text.endswith('{') and kind == 'then':  # '} else {'
                stack.append(('else', index))
                continue
        m = re.search(r'tt\.(load|store) (.*): ' + tensor, text)
        if m:
            kind, operands, shape, dtype, layout, dim, parent = m.groups()
            spt, tpw, wpc = layouts[parent or layout[1:]]
            count = math.prod(trips[i] for k, i in stack if k == 'for')
            elem = int(re.search(r'\d+', dtype).group()) // 8
            shape_t = tuple(int(v) for v in shape.split('x'))
            branches = tuple((i, k == 'then') for k, i in stack if k in ('then', 'else'))
            masked = kind == 'load' and operands.count('%') > 1
            found.append((Access(kind, shape_t, elem, (dim or '', spt, tpw, wpc), count), branches, masked))
        if text.endswith('{'):
            if 'scf.for' in text:
                stack.append(('for', n_loops))
                n_loops += 1
            elif 'scf.if' in text:
                stack.append(('then', n_ifs))
                n_ifs += 1
            else:
                stack.append(('region', -1))
    masked_in = collections.Counter((b, t) for _, branches, masked in found if masked for b, t in branches)
    has_else = {b for _, branches, _ in found for b, t in branches if not t}
    out = []
    for acc, branches, _ in found:
        for b, is_then in branches:
            if b in has_else:
                interior_is_then = masked_in[(b, True)] <= masked_in[(b, False)]
                acc.count *= interior if is_then == interior_is_then else 1 - interior
        out.append(acc)
    return out


def per_warp_instruction(acc: Access, num_warps: int) -> Tuple[float, int]:
    """(instructions a thread issues for the access, L1 wavefronts of each warp instruction). Threads move up to
    16 contiguous bytes an instruction; a warp instruction touches one 128-byte line per distinct pixel row and
    per 128 bytes of channels (pixel rows are C * elem bytes >= 128 apart, so they never share a line)."""
    dim, spt, tpw, wpc = acc.layout
    dims = [d for d in range(len(spt)) if str(d) != dim]  # the tensor's dims in the parent layout
    per_thread = [spt[d] * max(1, n // (spt[d] * tpw[d] * wpc[d])) for d, n in zip(dims, acc.shape)]
    vec = min(spt[dims[-1]], 16 // acc.elem_bytes)
    rows = min(tpw[0], acc.shape[0]) if dims[0] == 0 and len(dims) == 2 else 1
    if dims == [0]:  # a vector along pixels: one line per row
        return math.prod(per_thread) / vec, min(tpw[0], acc.shape[0])
    last = dims[-1]
    span = min(tpw[last] * spt[last], acc.shape[-1]) * acc.elem_bytes
    return math.prod(per_thread) / vec, rows * -(-span // LINE)


# ---------------------------------------------------------------------------------------------------------------
# SASS: loops, instruction counts, the one-program trace
# ---------------------------------------------------------------------------------------------------------------


# opcodes sass_scan's table leaves under 'other' that matter here: zeroing of masked-load targets, adds, and
# the constant-bank loads (their pipes are assumptions: integer ALU, and no FMA / ALU / MUFU cycles for LDC)
ZEROING = 'CS2R (zeroing masked-off loads)'
ROWS = [*scan.ROWS[:-2], ZEROING, 'LDC (constant bank)', *scan.ROWS[-2:]]
EXTRA_KIND = {'CS2R': (ZEROING, 'alu'), 'VIADD': (scan._INT, 'alu'), 'SGXT': (scan._INT, 'alu'),
              'LDC': ('LDC (constant bank)', 'lsu')}  # fmt: skip


def classify(op: str) -> Tuple[str, str]:
    """(table row, pipe) of an opcode: sass_scan's, plus EXTRA_KIND."""
    return EXTRA_KIND.get(op.split('.')[0]) or scan.classify(op)


def sass_instructions(sass: str) -> List[scan.Instr]:
    return [(int(a, 16), p or '', op, rest.strip()) for a, p, op, rest in scan.SASS_LINE.findall(sass)]


def sass_loops(ins: List[scan.Instr]) -> List[Loop]:
    """Loop bodies (backward-branch target, branch address) in pre-order: by start, outer before inner."""
    spans = set()
    for addr, _, op, rest in ins:
        m = re.search(r'0x([0-9a-f]+)', rest) if op.startswith('BRA') else None
        if m and int(m.group(1), 16) < addr:
            spans.add((int(m.group(1), 16), addr))
    return sorted(spans, key=lambda s: (s[0], -s[1]))


def loop_depths(loops: List[Loop]) -> List[int]:
    return [sum(lo <= a and b <= hi for lo, hi in loops) for a, b in loops]


def program_trace(ins: List[scan.Instr], loops: List[Loop], trips: List[int], want: int) -> List[scan.Instr]:
    """The instructions one program executes, in order, when it runs the loop nest starting at loop ``want``.
    A loop runs its trip count of iterations (counted as arrivals at its first instruction): a conditional
    latch branches back until then; a predicated branch out of the loop is taken once they are done (after the
    last body when it sits in the loop's second half, before a further body when in the first). Any other
    predicated forward branch is taken only to reach the wanted nest (the K <= 0 guard, the interior / edge
    split), so code under a runtime if counts; a predicated EXIT does not end the trace."""
    index = {ins[i][0]: i for i in range(len(ins))}
    loop_of = {hi: n for n, (lo, hi) in enumerate(loops)}
    start = loops[want][0]
    arrivals: Dict[int, int] = collections.Counter()
    out: List[scan.Instr] = []
    pc, reached = 0, False
    while pc < len(ins) and len(out) < 10_000_000:
        addr, pred, op, rest = ins[pc]
        for n, (lo, _) in enumerate(loops):
            arrivals[n] += lo == addr
        out.append(ins[pc])
        reached |= addr == start
        pc += 1
        if op == 'EXIT' and not pred:
            break
        m = re.search(r'0x([0-9a-f]+)', rest) if op.startswith('BRA') else None
        if not m:
            continue
        target = int(m.group(1), 16)
        exits = [n for n, (lo, hi) in enumerate(loops) if lo <= addr <= hi and not lo <= target <= hi]
        if target <= addr and addr in loop_of:  # a loop's latch
            n = loop_of[addr]
            if not pred or arrivals[n] < trips[n]:
                pc = index[target]
            else:
                arrivals[n] = 0
        elif pred and exits:
            n = min(exits, key=lambda n: loops[n][1] - loops[n][0])
            lo, hi = loops[n]
            if arrivals[n] >= trips[n] + (addr < (lo + hi) // 2):
                for e in exits:
                    arrivals[e] = 0
                pc = index[target]
        elif not pred or (not reached and start >= target):
            for e in exits:
                arrivals[e] = 0
            pc = index[target]
    if len(out) >= 10_000_000:
        raise RuntimeError('the trace did not reach EXIT: a loop shape the trace model does not know')
    return out


def interior_share(shape: Sequence[int], cfg) -> float:
    """Share of programs whose tile and its one-pixel halo lie inside the frame and whose channel block is whole
    (the stencil runs them without masks)."""
    _, _, h, w, c = shape
    inside = lambda n, block: sum(0 < s and s + block < n for s in range(0, n, block)) / -(-n // block)  # noqa: E731
    return inside(h, cfg.block_h) * inside(w, cfg.block_w) * (c % cfg.block_c == 0)


def alternative_traces(
    ins: List[scan.Instr], loops: List[Loop], trips: List[int], depths: List[int], interior: float
) -> List[Tuple[float, List[scan.Instr]]]:
    """(share of programs, trace) for each outermost loop nest: one, or two for an interior / edge split, where
    the nest with fewer predicated loads is the interior one."""
    nests = [n for n, d in enumerate(depths) if d == 1]
    if len(nests) == 1:
        return [(1.0, program_trace(ins, loops, trips, nests[0]))]
    if len(nests) != 2:
        raise RuntimeError(f'{len(nests)} outermost loops: expected the frame loop, or an interior and an edge copy')
    masked = [sum(op.startswith('LDG') and bool(p) for a, p, op, _ in ins if loops[n][0] <= a <= loops[n][1])
              for n in nests]  # fmt: skip
    inner, edge = (nests[0], nests[1]) if masked[0] <= masked[1] else (nests[1], nests[0])
    return [(interior, program_trace(ins, loops, trips, inner)), (1 - interior, program_trace(ins, loops, trips, edge))]


def occupancy(regs: int, shared: int, num_warps: int) -> int:
    """Programs resident on an SM: registers (allocated 8 a thread at a time), warps, programs, 227 KiB shared."""
    by_regs = REGS_PER_SM // (-(-regs // 8) * 8 * 32 * num_warps)
    by_shared = (227 * 1024) // shared if shared else MAX_PROGRAMS_PER_SM
    return max(0, min(by_regs, MAX_WARPS_PER_SM // num_warps, MAX_PROGRAMS_PER_SM, by_shared))


# ---------------------------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------------------------


def analyse(label: str, cfg, mod, shape: Sequence[int], mode: int, dtype: torch.dtype, keep: str = '') -> Dict:
    compiled, grid, args = compile_stencil(mod, cfg, shape, mode, dtype)
    asm = compiled.asm
    sass = scan.sass_text(asm['cubin'])
    if keep:
        folder = Path(keep)
        folder.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r'[^\w=.-]', '_', label)
        for key in ('ttgir', 'ptx'):
            (folder / f'{stem}.{key}').write_text(asm[key])
        (folder / f'{stem}.sass').write_text(sass)
    trips, tdepths = ttgir_loops(asm['ttgir'], args)
    ins = sass_instructions(sass)
    loops = sass_loops(ins)
    depths = loop_depths(loops)
    if depths != tdepths:
        raise RuntimeError(f'SASS loops {loops} (depths {depths}) do not match the TTGIR loops '
                           f'(depths {tdepths}, trips {trips}): the compiler unrolled or split one')  # fmt: skip
    info = scan.ptxas_info(asm['ptx'])
    shared = compiled.metadata.shared
    warps = cfg.num_warps
    programs = grid[0] * grid[1]
    frames = shape[1]  # frame-loop iterations of a program: the per-iteration unit below
    out_per_warp_frame = cfg.block_h * cfg.block_w * cfg.block_c / warps
    interior = interior_share(shape, cfg)
    alternatives = alternative_traces(ins, loops, trips, depths, interior)

    rows: Dict[str, float] = collections.Counter()
    widths: Dict[str, float] = collections.Counter()
    pipes: Dict[str, float] = collections.Counter()
    for share, trace in alternatives:
        for _, _, op, _ in trace:
            row, pipe = classify(op)
            rows[row] += share / frames
            rows['total'] += share / frames
            pipes[pipe] += share * scan.CYCLES.get(pipe, 0) / frames
            if row in ('LDG', 'STG'):
                width = op.rsplit('.', 1)[-1] if op.count('.') >= 2 else '32'
                widths[f'{row}.{width}'] += share / frames

    accesses = ttgir_accesses(asm['ttgir'], trips, interior)
    wavefronts = 0.0
    for acc in accesses:
        n, per = per_warp_instruction(acc, warps)
        wavefronts += acc.count * n * per / frames  # a warp's wavefronts per frame iteration
    first = lambda pred: next((a.describe() for a in accesses if pred(a)), '-')  # noqa: E731
    is_tile = lambda a: len(a.shape) == 2  # noqa: E731

    resident = occupancy(info['regs'], shared, warps)
    warps_per_smsp = resident * warps / 4
    in_order = {name: sum(share * scan.in_order_cycles(trace, lat, iterations=2) for share, trace in alternatives)
                for name, lat in LOAD_LATENCY.items()}  # fmt: skip

    # floors, ms for the whole call
    warp_frames = programs * warps * frames
    per_smsp = warp_frames / (4 * scan.SM_COUNT)  # warp-frame iterations each sub-partition runs
    ms = lambda cycles: cycles / (CLOCK_GHZ * 1e6)  # noqa: E731
    elem = torch.empty(0, dtype=dtype).element_size()
    tensors = 3 if mode == MODES['gelu_grad'] else 2
    dram_bytes = tensors * math.prod(shape) * elem
    halo = (cfg.block_h + 2) * (cfg.block_w + 2) * cfg.block_c * elem * frames  # x tile and halo, every frame
    l2_bytes = programs * (halo + 28 * cfg.block_c * 4) + (tensors - 1) * math.prod(shape) * elem  # + taps, y, g
    floors = {
        'issue': ms(per_smsp * rows['total']),
        'FMA pipe': ms(per_smsp * (pipes['fma'] + pipes['fmah'])),
        'ALU pipe': ms(per_smsp * pipes['alu']),
        'MUFU': ms(per_smsp * pipes['mufu']),
        'L1 wavefronts': ms(warp_frames * wavefronts / scan.SM_COUNT),
        f'L2 -> SM bytes (assumed {L2_TBPS} TB/s)': l2_bytes / (L2_TBPS * 1e9),
        'DRAM': dram_bytes / (HBM_TBPS * 1e9),
    }
    waves = math.ceil(programs / (resident * scan.SM_COUNT)) if resident else math.inf
    # every warp of a wave takes at least its in-order time: a floor with L1-hit loads; with every load waiting
    # for L2 it is an upper estimate of latency's share instead (most shifted loads hit L1)
    floors['latency, loads hit L1'] = ms(waves * in_order['L1'])
    pessimistic = ms(waves * in_order['L2'])
    return dict(
        label=label, cfg=cfg, info=info, interior=interior if len(alternatives) > 1 else None,
        per_alternative=[len(trace) / frames for _, trace in alternatives], shared=shared, resident=resident,
        warps_per_smsp=warps_per_smsp, programs=programs, waves=programs / max(resident * scan.SM_COUNT, 1),
        loops=loops, trips=trips,
        x_layout=first(lambda a: a.kind == 'load' and is_tile(a)),
        w_layout=first(lambda a: a.kind == 'load' and not is_tile(a) and a.count > 1),
        y_layout=first(lambda a: a.kind == 'store'),
        rows=rows, widths=widths, pipes=pipes, wavefronts=wavefronts, out_per_warp_frame=out_per_warp_frame,
        in_order={n: v / frames for n, v in in_order.items()}, floors=floors, pessimistic=pessimistic,
        dram_gb=dram_bytes / 1e9, l2_gb=l2_bytes / 1e9,
    )  # fmt: skip


def table(results: List[Dict]) -> str:
    lines = ['| one warp, one frame iteration (per output element: thread instructions) | '
             + ' | '.join(r['label'] for r in results) + ' |', '|' + ' --- |' * (len(results) + 1)]  # fmt: skip
    add = lambda label, vals: lines.append(f'| {label} | ' + ' | '.join(vals) + ' |')  # noqa: E731
    num = lambda x: '-' if x is None else f'{x:.4g}' if x else '0'  # noqa: E731
    per_elem = lambda r, x: f'{num(x)} ({32 * x / r["out_per_warp_frame"]:.3g})'  # noqa: E731
    cfg = lambda r: r['cfg']  # noqa: E731
    add('tile (h x w px x channels), warps',
        [f'{cfg(r).block_h}x{cfg(r).block_w}x{cfg(r).block_c}, {cfg(r).num_warps}' for r in results])  # fmt: skip
    add('registers', [str(r['info']['regs']) for r in results])
    add('stack / spill st / spill ld (bytes)',
        [f"{r['info']['stack']} / {r['info']['spill_st']} / {r['info']['spill_ld']}" for r in results])  # fmt: skip
    add('shared memory (bytes)', [str(r['shared']) for r in results])
    add('programs an SM (warps a sub-partition); waves',
        [f"{r['resident']} ({r['warps_per_smsp']:g}); {r['waves']:.1f}" for r in results])  # fmt: skip
    add(
        'interior tiles (share of programs)',
        ['-' if r['interior'] is None else f'{r["interior"]:.3f}' for r in results],
    )
    add('instructions a frame: interior / edge tiles', [' / '.join(f'{n:.0f}' for n in r['per_alternative'])
                                                         for r in results])  # fmt: skip
    add(
        'SASS loops: instructions x trips',
        [', '.join(f'{(hi - lo) // 16 + 1}x{t}' for (lo, hi), t in zip(r['loops'], r['trips'])) for r in results],
    )
    add('x load layout (sizePerThread / threadsPerWarp)', [r['x_layout'] for r in results])
    add('tap-weight load layout', [r['w_layout'] for r in results])
    add('y store layout', [r['y_layout'] for r in results])
    for w in sorted({w for r in results for w in r['widths']}):
        add(w, [num(r['widths'][w]) for r in results])
    for row in ROWS:
        if row not in ('LDG', 'STG') and any(r['rows'][row] for r in results):
            label = f'**{row}**' if row == 'total' else row
            add(label, [per_elem(r, r['rows'][row]) for r in results])
    add('cycles: FMA pipe (FP32 1, IMAD 2)', [num(r['pipes']['fma'] + r['pipes']['fmah']) for r in results])
    add('cycles: ALU (2 a warp instruction)', [num(r['pipes']['alu']) for r in results])
    add('cycles: MUFU (8 a warp instruction)', [num(r['pipes']['mufu']) for r in results])
    add('L1 wavefronts (SM-wide)', [num(r['wavefronts']) for r in results])
    for name in LOAD_LATENCY:
        add(f'one warp in order: cycles, {name}-hit loads', [num(r['in_order'][name]) for r in results])
    add('DRAM / L2 -> SM GB', [f'{r["dram_gb"]:.2f} / {r["l2_gb"]:.2f}' for r in results])
    for name in results[0]['floors']:
        add(f'floor, ms: {name}', [f'{r["floors"][name]:.3f}' for r in results])
    add('**largest floor**', [f'{max(r["floors"].items(), key=lambda kv: kv[1])[0]}' for r in results])
    add('latency if every load waited for L2, ms (upper)', [f'{r["pessimistic"]:.3f}' for r in results])
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('variants', nargs='*', default=['default', 'default,block_c=64,num_warps=4'])
    parser.add_argument('--shape', default='1,5,180,320,768', help='B,K,H,W,C')
    parser.add_argument('--mode', choices=sorted(MODES), default='gelu')
    parser.add_argument('--dtype', choices=sorted(scan.TORCH_DTYPES), default='bf16')
    parser.add_argument('--module', default='gsmsr.ops.dwconv3d', help='import name, or a .py copy to analyse')
    parser.add_argument('--keep', default='', help="folder for each variant's TTGIR, PTX and SASS")
    args = parser.parse_args(argv)
    mod = scan.load_module(args.module)
    shape = tuple(int(s) for s in args.shape.split(','))
    dtype = scan.TORCH_DTYPES[args.dtype]
    print(f'Triton {triton.__version__}, sm_90a, shape {shape}, {args.dtype}, mode {args.mode}\n')
    results = [analyse(*parse_variant(v, mod), mod, shape, MODES[args.mode], dtype, args.keep) for v in args.variants]
    print(table(results))


if __name__ == '__main__':
    main()
