"""GSMModel: BasicSR's video recurrent model with the GSMamba training recipe and test protocol.

Training (ARCHITECTURE.md §8), on top of ``VideoRecurrentModel`` (Charbonnier loss, Adam, ``flow_lr_mul`` for
SpyNet, EMA, cosine schedule all come from BasicSR and the options):

* ``train.fix_flow: N``: SpyNet gradients are zeroed after every backward while ``iter < N``. SpyNet keeps
  ``requires_grad`` and, with zero gradients, Adam leaves it exactly unchanged. Unlike BasicSR's
  ``requires_grad`` switch at iteration 1, this also holds after resuming inside the window.
* ``train.use_bf16``: forward under bf16 autocast (GSMNet keeps its geometry in fp32); the loss is fp32. On CPU
  the step runs with oneDNN off (its bf16 Conv3d backward crashes there, see ``_train_step_context``).
* ``train.cuda_graph``: on CUDA, the network's training forward and backward are captured once per input shape
  and replayed as CUDA graphs (:mod:`gsmsr.models.train_graphs`): the same kernels without the host launching
  each one. Autocast then runs without its weight cache.
* ``train.grad_clip_norm``: optional global gradient-norm clipping.
* A step whose loss (on any rank) or clipped gradient norm is not finite is skipped, with a warning in the log.
* Several processes (``--launcher pytorch``): rank 0's weights are broadcast when the network is placed, and the
  gradients averaged over ranks after each backward, without a DDP wrapper (:mod:`gsmsr.models.grad_sync`).

Validation and test (§9) run on CPU or GPU with the EMA network when there is one, optionally through
:func:`gsmsr.tiling.forward_chunked` (``val: {chunk, chunk_overlap, tile, tile_overlap}``), and score every
frame with BasicSR's metrics (``calculate_psnr`` / ``calculate_ssim`` on uint8 BGR images), averaged per clip
and then over clips. ``val.center_frame_only`` scores only the centre output frame, the Vimeo-90K-T protocol.

Checkpoints and training states are written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import OrderedDict
from os import path as osp
from typing import Any, BinaryIO, Dict, List, Mapping, Optional, Tuple

import cv2
import numpy as np
import torch
from basicsr.data.video_test_dataset import VideoTestVimeo90KDataset
from basicsr.metrics import calculate_metric
from basicsr.models.video_recurrent_model import VideoRecurrentModel
from basicsr.utils import get_root_logger, tensor2img
from basicsr.utils.dist_util import get_dist_info, master_only
from basicsr.utils.registry import MODEL_REGISTRY
from torch import Tensor, nn
from torch import distributed as dist
from torch.nn.parallel import DataParallel

from gsmsr.archs import load_checkpoint
from gsmsr.compat import take_resume_notes
from gsmsr.compile_cache import MegaCache, enable_persistent_caches
from gsmsr.faults import InputError, one_line
from gsmsr.models.grad_sync import average_gradients, broadcast_module
from gsmsr.models.train_graphs import install_train_graphs
from gsmsr.utils import atomic_write

__all__ = ['GSMModel', 'is_flow_param', 'score_frames', 'average_over_clips', 'atomic_torch_save', 'atomic_imwrite']


def is_flow_param(name: str) -> bool:
    """SpyNet parameters: the same rule BasicSR's ``flow_lr_mul`` grouping uses."""
    return 'spynet' in name


# ----------------------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------------------
class _WriteErrors:
    """A binary file for ``torch.save`` that keeps the first OSError of its writes: torch's writer turns it into a
    RuntimeError naming neither the file nor the cause ('unexpected pos 704 vs 598')."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()


def atomic_torch_save(obj: Any, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            writer = _WriteErrors(f)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None  # a full disk: an OSError with its errno, as the retry and report expect

    atomic_write(path, write)


def atomic_imwrite(img: np.ndarray, path: str) -> None:
    """Write an image (uint8 BGR, (H, W, 3)) with the encoder chosen by ``path``'s extension."""
    ok, buf = cv2.imencode(osp.splitext(path)[1] or '.png', img)
    if not ok:
        raise OSError(f'cannot encode image of shape {img.shape} for {path}')

    def write(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            f.write(buf.tobytes())

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------
def score_frames(outputs: List[np.ndarray], gts: List[np.ndarray], metrics: Mapping[str, Mapping]) -> np.ndarray:
    """BasicSR metrics of every frame: (T, M) float64, columns in ``metrics`` order.

    outputs, gts: T uint8 BGR images (H, W, 3) each, as ``basicsr.utils.tensor2img`` makes them.
    metrics: BasicSR metric options, e.g. ``{'psnr': {'type': 'calculate_psnr', 'crop_border': 0,
    'test_y_channel': False}}``.
    """
    scores = np.zeros((len(outputs), len(metrics)), dtype=np.float64)
    for t, (img, img2) in enumerate(zip(outputs, gts)):
        for m, metric_opt in enumerate(metrics.values()):
            scores[t, m] = calculate_metric({'img': img, 'img2': img2}, metric_opt)
    return scores


def average_over_clips(per_frame: Mapping[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """Frames averaged per clip, then clips averaged (every clip counts once, whatever its length).

    per_frame: clip -> (T_clip, M). Returns (clip -> (M,), (M,)).
    """
    per_clip = {clip: scores.mean(axis=0) for clip, scores in per_frame.items()}
    overall = np.mean(np.stack(list(per_clip.values())), axis=0)
    return per_clip, overall


# ----------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------
@MODEL_REGISTRY.register()
class GSMModel(VideoRecurrentModel):
    """GSMNet training / evaluation in BasicSR (``model_type: GSMModel``). See the module docstring."""

    def __init__(self, opt: Dict[str, Any]) -> None:
        if opt['is_train']:
            train_opt = opt['train']
            if train_opt.get('pixel_opt') is None or train_opt.get('perceptual_opt') is not None:
                raise ValueError(
                    'GSMModel trains with a pixel loss only: set train.pixel_opt '
                    '(e.g. CharbonnierLoss) and no train.perceptual_opt'
                )
        super().__init__(opt)
        self._megacache: Optional[MegaCache] = None
        self._megacache_saved = set()
        self._kernels_ahead = set()  # clip sizes (B, C, H, W) whose kernels test() started compiling ahead
        if self.device.type == 'cuda':  # before the first compilation, which reads the cache folders
            enable_persistent_caches()
            self._megacache = MegaCache.for_device(self.device)
            self._megacache.load()
        for note in take_resume_notes():  # resume warnings from before the logger existed
            get_root_logger().warning(note)
        if self.is_train:
            train_opt = opt['train']
            self.use_bf16 = bool(train_opt.get('use_bf16', False))
            self.grad_clip_norm = train_opt.get('grad_clip_norm')
            self.cuda_graph = bool(train_opt.get('cuda_graph', False)) and self.device.type == 'cuda'
            if self.cuda_graph:
                install_train_graphs(self.get_bare_model(self.net_g))
            self.skipped_steps = 0
            self._fix_flow_announced = False

    # -- devices -------------------------------------------------------------------------------------------
    def model_to_device(self, net: nn.Module) -> nn.Module:
        """Like BasicSR's, but distributed training is not wrapped in DDP: rank 0's weights are broadcast here and
        ``optimize_parameters`` averages the gradients after backward (:mod:`gsmsr.models.grad_sync` says why)."""
        net = net.to(self.device)
        if self.opt['dist']:
            broadcast_module(net)
        elif self.opt['num_gpu'] > 1:
            net = DataParallel(net)
        return net

    def _autocast(self, enabled: bool, cache: bool = True):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=cache)

    def _train_step_context(self):
        # oneDNN's bf16 Conv3d backward corrupts the heap or hangs on CPU (seen with torch 2.14 on an AMX CPU, on
        # the HR reconstruction convolutions); CPU bf16 training steps use PyTorch's native kernels instead.
        if self.use_bf16 and self.device.type == 'cpu':
            return torch.backends.mkldnn.flags(enabled=False)
        return contextlib.nullcontext()

    # -- training ------------------------------------------------------------------------------------------
    def flow_parameters(self) -> List[nn.Parameter]:
        return [p for name, p in self.get_bare_model(self.net_g).named_parameters() if is_flow_param(name)]

    def _all_ranks_finite(self, value: Tensor) -> bool:
        """True when ``value`` is finite on every rank (so that all ranks skip a step together)."""
        flag = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
        if self.opt['dist']:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def optimize_parameters(self, current_iter: int) -> None:
        logger = get_root_logger()
        fix_flow = self.fix_flow_iter
        if fix_flow and current_iter < fix_flow and not self._fix_flow_announced:  # also after a resume
            logger.info(f'SpyNet gradients are zeroed until iteration {fix_flow} (fix_flow).')
            self._fix_flow_announced = True
        elif fix_flow and current_iter == fix_flow:
            logger.info('fix_flow window over: SpyNet trains from this iteration on.')

        self.optimizer_g.zero_grad()
        with self._train_step_context():
            with self._autocast(self.use_bf16, cache=not self.cuda_graph):  # graphs cannot use the weight cache
                self.output = self.net_g(self.lq)
            l_pix = self.cri_pix(self.output.float(), self.gt)
            loss_dict = OrderedDict(l_pix=l_pix.detach())

            skip_reason = None
            if not self._all_ranks_finite(l_pix):
                skip_reason = f'non-finite loss (l_pix = {l_pix.item()} on this rank)'
            else:
                l_pix.backward()
                if self.opt['dist']:
                    average_gradients(self.net_g.parameters())
        if skip_reason is None:
            if fix_flow and current_iter < fix_flow:
                for p in self.flow_parameters():
                    if p.grad is not None:
                        p.grad.zero_()
            if self.grad_clip_norm:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.net_g.parameters(), float(self.grad_clip_norm))
                loss_dict['grad_norm'] = grad_norm.detach()
                if not torch.isfinite(grad_norm):  # gradients are all-reduced, so every rank agrees
                    skip_reason = f'non-finite gradient norm ({grad_norm.item()})'
        if skip_reason is None:
            self.optimizer_g.step()
            if self.ema_decay > 0:
                self.model_ema(decay=self.ema_decay)
        else:
            self.optimizer_g.zero_grad()
            self.skipped_steps += 1
            logger.warning(
                f'Iter {current_iter}: skipped the step, {skip_reason}; no weight or EMA update '
                f'({self.skipped_steps} step(s) skipped so far).'
            )
        self.log_dict = self.reduce_loss_dict(loss_dict)
        self._save_compile_cache('train')

    def _save_compile_cache(self, phase: str) -> None:
        """After the first training step and the first test: the compiled artefacts, for the next start."""
        if self._megacache is not None and phase not in self._megacache_saved and get_dist_info()[0] == 0:
            self._megacache_saved.add(phase)
            self._megacache.save()

    # -- checkpoints ---------------------------------------------------------------------------------------
    def load_network(
        self, net: nn.Module, load_path: str, strict: bool = True, param_key: Optional[str] = 'params'
    ) -> None:
        """Load a BasicSR (``params`` / ``params_ema``), bare or official GSMamba checkpoint.

        A file without ``param_key`` falls back to the other BasicSR key (as BasicSR does), with a log line. A
        missing or unreadable file is an :class:`InputError` naming it.
        """
        logger = get_root_logger()
        if not osp.isfile(load_path):
            raise InputError(f'{load_path}: checkpoint not found')
        try:
            ckpt = torch.load(load_path, map_location='cpu', weights_only=True)
        except Exception as err:  # truncated or not a torch file: name it (torch's message does not)
            cause = f'{type(err).__name__}: {one_line(err, 200)}'
            raise InputError(f'{load_path}: cannot read checkpoint ({cause})') from err
        if isinstance(ckpt, dict) and param_key is not None and param_key not in ckpt:
            other = {'params': 'params_ema', 'params_ema': 'params'}.get(param_key)
            if other in ckpt:
                logger.info(f'{load_path} has no {param_key!r}; loading {other!r}.')
                param_key = other
        bare = self.get_bare_model(net)
        logger.info(f'Loading {bare.__class__.__name__} from {load_path} [{param_key}].')
        load_checkpoint(bare, ckpt, key=param_key, strict=strict)

    @master_only
    def save_network(self, net, net_label: str, current_iter: int, param_key='params') -> None:
        """BasicSR's checkpoint layout (``{param_key: state_dict}``), written atomically."""
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        if len(nets) != len(keys):
            raise ValueError(f'{len(nets)} networks but {len(keys)} param keys')
        label = 'latest' if current_iter == -1 else current_iter
        save_dict = {}
        for net_, key in zip(nets, keys):
            state = self.get_bare_model(net_).state_dict()
            save_dict[key] = OrderedDict((k[7:] if k.startswith('module.') else k, v.cpu()) for k, v in state.items())
        self._save_with_retry(save_dict, osp.join(self.opt['path']['models'], f'{net_label}_{label}.pth'))

    @master_only
    def save_training_state(self, epoch: int, current_iter: int) -> None:
        if current_iter == -1:
            return
        state = {
            'epoch': epoch,
            'iter': current_iter,
            'optimizers': [o.state_dict() for o in self.optimizers],
            'schedulers': [s.state_dict() for s in self.schedulers],
        }
        self._save_with_retry(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))

    @staticmethod
    def _save_with_retry(obj: Any, path: str, attempts: int = 3) -> None:
        # Network file systems fail now and then; a failed attempt leaves nothing behind (atomic write).
        for attempt in range(1, attempts + 1):
            try:
                atomic_torch_save(obj, path)
                return
            except OSError as err:
                if attempt == attempts:
                    raise
                get_root_logger().warning(f'Saving {path} failed ({err}); retrying ({attempt}/{attempts}).')
                time.sleep(1)

    # -- evaluation ----------------------------------------------------------------------------------------
    def eval_network(self) -> nn.Module:
        """The network used for validation / test: the EMA copy when training with EMA, else net_g."""
        return self.net_g_ema if hasattr(self, 'net_g_ema') else self.get_bare_model(self.net_g)

    def test(self) -> None:
        """``self.lq`` (B, T, C, H, W) -> ``self.output`` (B, T, C, sH, sW), float32, on the model's device.

        Options under ``val``: ``chunk`` / ``chunk_overlap`` / ``tile`` / ``tile_overlap`` (0 = off; §9),
        ``flip_seq`` (also run the time-reversed clip and average, BasicSR's option), ``use_bf16`` and
        ``compile`` (``GSMNet.compile_blocks``). On CUDA both default to on, the fast inference path (within
        74.8 dB PSNR of the faithful output, benchmarks/NOTES.md), for tests and for validation during training;
        elsewhere to off. Validation on the training network itself (no EMA) leaves its compilation as training set
        it, since compiling happens in place.
        """
        val_opt = self.opt.get('val') or {}
        on_cuda = self.device.type == 'cuda'
        use_bf16 = bool(val_opt.get('use_bf16', on_cuda))
        net = self.eval_network()
        trains_this_net = self.opt.get('is_train', False) and net is self.get_bare_model(self.net_g)
        if hasattr(net, 'compile_blocks') and not trains_this_net:
            net.compile_blocks = bool(val_opt.get('compile', on_cuda))
        was_training = net.training
        net.eval()
        lq = self.lq
        n = lq.size(1)
        if val_opt.get('flip_seq', False):
            lq = torch.cat([lq, lq.flip(1)], dim=1)
        chunk, tile = int(val_opt.get('chunk', 0) or 0), int(val_opt.get('tile', 0) or 0)
        with torch.no_grad(), self._autocast(use_bf16):
            if chunk or tile:
                from gsmsr.tiling import forward_chunked

                out = forward_chunked(
                    net,
                    lq,
                    self.opt['scale'],
                    chunk=chunk,
                    chunk_overlap=int(val_opt.get('chunk_overlap', 2)),
                    tile=tile,
                    tile_overlap=int(val_opt.get('tile_overlap', 50)),
                )
            else:
                self._compile_kernels_ahead(net, lq)
                out = net(lq)
        out = out.float()
        if val_opt.get('flip_seq', False):
            out = 0.5 * (out[:, :n] + out[:, n:].flip(1))
        self.output = out
        net.train(was_training)
        self._save_compile_cache('test')

    def _compile_kernels_ahead(self, net: torch.nn.Module, lq: torch.Tensor) -> None:
        """Once per clip size: :meth:`GSMNet.compile_kernels_ahead`, so that on an empty kernel cache the first clip's
        kernels compile side by side (while its SWSA runs) instead of one at each first launch."""
        size = (lq.shape[0], *lq.shape[2:])
        if hasattr(net, 'compile_kernels_ahead') and size not in self._kernels_ahead:
            self._kernels_ahead.add(size)
            net.compile_kernels_ahead(lq.shape)

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img: bool) -> None:
        self._validate(dataloader.dataset, current_iter, tb_logger, save_img)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img: bool) -> None:
        self._validate(dataloader.dataset, current_iter, tb_logger, save_img)

    def _validate(self, dataset, current_iter, tb_logger, save_img: bool) -> Optional[Dict[str, Any]]:
        """Evaluate every clip of ``dataset`` (ranks split the clips); rank 0 logs and returns the results.

        Works with BasicSR's ``VideoRecurrentTestDataset`` (one item = one clip, all frames scored) and
        ``VideoTestVimeo90KDataset`` (one item = 7 LR frames + the centre GT; requires center_frame_only).
        """
        dataset_name = dataset.opt['name']
        val_opt = self.opt['val']
        metrics = val_opt.get('metrics') or {}
        center_only = bool(val_opt.get('center_frame_only', False))
        rank, world_size = get_dist_info()

        per_frame: Dict[str, np.ndarray] = {}
        for index in range(rank, len(dataset), world_size):
            data = dataset[index]
            clip = self._clip_name(dataset, data)
            lq = data['lq']
            self.lq = lq.unsqueeze(0).to(self.device)
            self.test()
            out = self.output[0].cpu()
            del self.lq, self.output
            gt = data.get('gt')
            frame_ids = list(range(out.size(0)))
            if center_only:
                frame_ids = [lq.size(0) // 2]
                out = out[frame_ids[0] : frame_ids[0] + 1]
                if gt is not None and gt.dim() == 3:
                    gt = gt.unsqueeze(0)
            elif gt is not None and gt.dim() == 3:
                raise ValueError(
                    f'{dataset_name}: clip {clip} has a single GT frame for {lq.size(0)} input '
                    'frames; set val.center_frame_only: true (the Vimeo-90K-T protocol)'
                )
            images = [tensor2img(frame) for frame in out]
            if save_img:
                vimeo = isinstance(dataset, VideoTestVimeo90KDataset)
                names = [f'im{i + 1}' if vimeo else f'{i:08d}' for i in frame_ids]  # the source frame names
                self._save_frames(images, names, dataset_name, clip, current_iter)
            if metrics and gt is not None:
                if tuple(gt.shape) != tuple(out.shape):
                    raise ValueError(
                        f'{dataset_name}: clip {clip}: output shape {tuple(out.shape)} does not '
                        f'match GT shape {tuple(gt.shape)} (check scale and the LR/GT folders)'
                    )
                per_frame[clip] = score_frames(images, [tensor2img(frame) for frame in gt], metrics)

        if self.opt['dist']:
            gathered: List[Dict[str, np.ndarray]] = [None] * world_size  # type: ignore[list-item]
            dist.all_gather_object(gathered, per_frame)
            per_frame = {clip: s for part in gathered for clip, s in part.items()}
        if rank != 0 or not metrics or not per_frame:
            return None
        per_frame = dict(sorted(per_frame.items()))
        per_clip, overall = average_over_clips(per_frame)
        names = list(metrics.keys())
        self._initialize_best_metric_results(dataset_name)
        for m, name in enumerate(names):
            self._update_best_metric_result(dataset_name, name, float(overall[m]), current_iter)
        results = {
            'dataset': dataset_name,
            'iter': current_iter,
            'center_frame_only': center_only,
            'num_clips': len(per_clip),
            'num_frames': int(sum(len(s) for s in per_frame.values())),
            'average': {name: float(overall[m]) for m, name in enumerate(names)},
            'clips': {clip: {name: float(v[m]) for m, name in enumerate(names)} for clip, v in per_clip.items()},
        }
        self._log_results(results, names, tb_logger)
        if not self.opt['is_train']:
            atomic_write(
                osp.join(self.opt['path']['results_root'], f'metrics_{dataset_name}.json'),
                lambda tmp: _write_json(tmp, results),
            )
        self.last_val_results = results
        return results

    @staticmethod
    def _clip_name(dataset, data: Mapping[str, Any]) -> str:
        if isinstance(dataset, VideoTestVimeo90KDataset):  # folder is 'vimeo90k' for all; name the sequence
            parts = osp.normpath(data['lq_path']).split(os.sep)
            return f'{parts[-3]}/{parts[-2]}'
        return str(data['folder'])

    def _save_frames(
        self, images: List[np.ndarray], names: List[str], dataset_name: str, clip: str, current_iter
    ) -> None:
        folder = osp.join(self.opt['path']['visualization'], dataset_name, clip)
        suffix = f'_{current_iter}' if self.opt['is_train'] else ''
        for img, name in zip(images, names):
            atomic_imwrite(img, osp.join(folder, f'{name}{suffix}.png'))

    def _log_results(self, results: Dict[str, Any], names: List[str], tb_logger) -> None:
        dataset_name, current_iter = results['dataset'], results['iter']
        lines = [
            f'Validation {dataset_name} ({results["num_clips"]} clips, {results["num_frames"]} scored frames'
            f'{", centre frame only" if results["center_frame_only"] else ""}) @ {current_iter}'
        ]
        for name in names:
            best = self.best_metric_results[dataset_name][name]
            lines.append(f'\t # {name}: {results["average"][name]:.4f}\tBest: {best["val"]:.4f} @ {best["iter"]}')
        for clip, values in results['clips'].items():
            lines.append(f'\t   {clip}: ' + '  '.join(f'{name} {values[name]:.4f}' for name in names))
        get_root_logger().info('\n'.join(lines))
        if tb_logger and isinstance(current_iter, int):
            for name in names:
                tb_logger.add_scalar(f'metrics/{dataset_name}/{name}', results['average'][name], current_iter)


def _write_json(path: str, obj: Any) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=2)
