# Copyright (c) mmnorm contributors. All rights reserved.
"""Recompute batch-average BN statistics before validation, test and the last checkpoint."""
import time
import weakref
from typing import List, Optional

from mmengine.dataset import DefaultSampler
from mmengine.hooks import EMAHook, Hook
from mmengine.registry import HOOKS
from mmengine.runner import BaseLoop, Runner, get_priority
from torch import nn
from torch.utils.data import DataLoader

from ..batch_stats import ESTIMATORS, recompute_batch_stats
from .runner_model import averaged_models, ema_hooks, runner_model

__all__ = ['BatchAverageStatsHook']


@HOOKS.register_module()
class BatchAverageStatsHook(Hook):
    """Replace moving-average BN statistics by a batch average before they are used.

    SN study Sec. 3: BN in SN is evaluated with a batch average computed after training. This hook
    runs :func:`mmnorm.engine.recompute_batch_stats` on ``num_iters`` training batches (frozen
    weights, no gradients) for every SN/SN_tied/BCN (non-estimated) and ``_BatchNorm`` layer:

    - at the start of every validation and test epoch, for the weights that are evaluated,
    - after the last training iteration, *before* ``CheckpointHook`` saves the final
      checkpoint (whether it counts epochs or iterations), for the weights that are saved,

    and skips the work when those weights were not trained since their last computation.
    Statistics are all-reduced, so every rank holds identical buffers.

    With mmengine's ``EMAHook`` (RTMDet's and YOLOX's configs have one), the averaged weights
    are both evaluated and saved: this hook's priority, BELOW_NORMAL, puts it after the EMA
    hook's swap of the averaged weights into the model at the start of an epoch (NORMAL, or 49
    in those configs), so that validation uses the batch average of the averaged weights, and
    after its swap back at the end, when the averaged copy (``ema_model.module``, which the EMA
    hook writes as every checkpoint's ``state_dict``) is given the statistics validation used
    (with ``update_buffers=False`` the swap leaves them in the model); the final statistics are
    computed for the averaged copy. (All before CheckpointHook, VERY_LOW.) The EMA hook swaps
    tensors in and out of both models, so each validation and test recomputes.

    Args:
        num_iters (int): batches K per computation. Defaults to 200 (as precise-BN tools use).
        estimator (str): ``'batch_average'`` or ``'population'``. Defaults to
            ``'batch_average'``.
        before_val (bool): run before validation. Defaults to True.
        before_test (bool): run before test (needs ``train_dataloader`` in the config).
            Defaults to True.
        before_last_checkpoint (bool): run at the end of training. Defaults to True.
        log_interval (int): log progress every this many batches. Defaults to 50.

    Example:
        >>> custom_hooks = [dict(type='BatchAverageStatsHook', num_iters=100)]
    """

    priority = 'BELOW_NORMAL'  # after EMAHook's swap (see above)

    def __init__(self, num_iters: int = 200, estimator: str = 'batch_average',
                 before_val: bool = True, before_test: bool = True,
                 before_last_checkpoint: bool = True, log_interval: int = 50):
        if estimator not in ESTIMATORS:
            raise ValueError(f'estimator must be one of {ESTIMATORS}, got {estimator!r}')
        if num_iters < 1:
            raise ValueError(f'num_iters must be >= 1, got {num_iters}')
        if log_interval < 1:  # (refused here, not at the end of training)
            raise ValueError(f'log_interval must be >= 1, got {log_interval}')
        self.num_iters = num_iters
        self.estimator = estimator
        self.run_before_val = before_val
        self.run_before_test = before_test
        self.run_before_last_checkpoint = before_last_checkpoint
        self.log_interval = log_interval
        # training iterations done at each model's last computation
        self._computed_at: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._loader: Optional[DataLoader] = None

    def before_run(self, runner: Runner) -> None:
        late = [hook for hook in runner.hooks if isinstance(hook, EMAHook)
                and get_priority(hook.priority) >= get_priority(self.priority)]
        if late:
            runner.logger.warning(
                f'BatchAverageStatsHook: an EMAHook runs at priority '
                f'{get_priority(late[0].priority)}, not before this hook '
                f'({get_priority(self.priority)}): statistics would be recomputed before it '
                f'swaps the averaged weights in, for the other weights; give it a smaller '
                f'priority (NORMAL, its default, or 49 as in RTMDet\'s configs)')

    def before_val_epoch(self, runner: Runner) -> None:
        if self.run_before_val:
            self._recompute(runner, [runner_model(runner)], 'before validation', runner.iter)

    def before_test_epoch(self, runner: Runner) -> None:
        if self.run_before_test:
            self._recompute(runner, [runner_model(runner)], 'before test', runner.iter)

    def after_val_epoch(self, runner: Runner, metrics=None) -> None:
        if self.run_before_val:
            self._give_averaged_copies_the_statistics(runner)

    def after_test_epoch(self, runner: Runner, metrics=None) -> None:
        if self.run_before_test:
            self._give_averaged_copies_the_statistics(runner)

    @staticmethod
    def _give_averaged_copies_the_statistics(runner: Runner) -> None:
        """After the EMA hooks' swap back: an ``update_buffers=False`` hook swapped weights
        only, so the statistics recomputed for its copy's weights stayed in the model; its copy
        (what a checkpoint saved now holds) gets them, as its own update would copy them."""
        model = runner_model(runner)
        for hook in ema_hooks(runner):
            if not hook.ema_model.update_buffers:
                for averaged, own in zip(hook.ema_model.module.buffers(), model.buffers()):
                    averaged.data.copy_(own.data)

    def after_train_iter(self, runner: Runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        # After the last iteration, in epoch loops too: a CheckpointHook counting iterations
        # (by_epoch=False) saves the last checkpoint there, before the epoch's end. An epoch
        # loop's last iteration is its last epoch's last batch (mmengine resumes an epoch loop
        # from a mid-epoch checkpoint at the epoch's start, its count of iterations kept, so
        # that count passes max_iters before the end).
        if not self.run_before_last_checkpoint:
            return
        if self._by_epoch(runner):
            last = (self.is_last_train_epoch(runner)
                    and self.end_of_epoch(runner.train_dataloader, batch_idx))
        else:
            last = self.is_last_train_iter(runner)
        if last:
            self._recompute(runner, self._saved_models(runner), 'before the last checkpoint',
                            runner.iter + 1)

    @staticmethod
    def _saved_models(runner: Runner) -> List[nn.Module]:
        """The models whose weights the final checkpoint holds: EMA hooks' averaged copies
        (written as its ``state_dict``), else the runner's model."""
        return averaged_models(runner) or [runner_model(runner)]

    @staticmethod
    def _by_epoch(runner: Runner) -> bool:
        loop = runner._train_loop
        return isinstance(loop, BaseLoop) and type(loop).__name__.startswith('EpochBased')

    def _recompute(self, runner: Runner, models: List[nn.Module], when: str,
                   trained_iters: int) -> None:
        if not ema_hooks(runner):  # (EMA hooks swap tensors in and out of the models)
            models = [m for m in models if self._computed_at.get(m) != trained_iters]
            if not models:
                return  # nothing trained since the last computation
        loader = self._train_dataloader(runner)
        if loader is None:
            runner.logger.warning(
                f'BatchAverageStatsHook: no train_dataloader to compute statistics from '
                f'({when}); evaluating with the statistics in the model')
            return

        def progress(done: int) -> None:
            if done % self.log_interval == 0 and done < self.num_iters:
                runner.logger.info(f'BatchAverageStatsHook: {done}/{self.num_iters} batches')

        for model in models:
            start = time.time()
            averaged = ' (EMA weights)' if model is not runner_model(runner) else ''
            runner.logger.info(f'BatchAverageStatsHook: recomputing statistics {when}{averaged} '
                               f'from {self.num_iters} training batches ({self.estimator})')
            recompute_batch_stats(model, loader, self.num_iters, estimator=self.estimator,
                                  progress=progress)
            runner.logger.info(f'BatchAverageStatsHook: done in {time.time() - start:.1f} s')
            self._computed_at[model] = trained_iters

    def _train_dataloader(self, runner: Runner) -> Optional[DataLoader]:
        """A loader of its own over the training dataset.

        The training loop's loader must not be iterated here: mmengine's InfiniteSampler shares
        one index generator between iterators, and abandoning an iterator closes it, which would
        end the training loop's data. So the statistics come from a separate loader (same
        dataset, batch size and collate function, a shuffled finite sampler sharded by rank).
        """
        if self._loader is not None:
            return self._loader
        if isinstance(runner._train_loop, BaseLoop):
            source = runner.train_loop.dataloader
        else:
            cfg = runner._train_dataloader
            if cfg is None:
                return None
            source = Runner.build_dataloader(cfg, seed=runner.seed) if isinstance(cfg, dict) \
                else cfg
        batch_size = source.batch_size or getattr(source.batch_sampler, 'batch_size', 1)
        self._loader = DataLoader(
            source.dataset, batch_size=batch_size, num_workers=source.num_workers,
            sampler=DefaultSampler(source.dataset, shuffle=True, seed=runner.seed),
            collate_fn=source.collate_fn, drop_last=True)
        return self._loader
