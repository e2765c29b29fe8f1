# Copyright (c) mmnorm contributors. All rights reserved.
"""Distributed runs on machines without CUDA.

mmengine's ``pytorch`` and ``slurm`` launchers call ``torch.cuda.set_device`` before
``init_process_group`` and so crash where there is no GPU, and its default DDP wrapper pins
``device_ids=[LOCAL_RANK]``, which DDP rejects for CPU modules. :func:`prepare_distributed` fills
the gap for the training/test tools: without CUDA it initializes the process group itself with the
``gloo`` backend from the launcher's environment, and configures the DDP wrapper for CPU. mmengine
then sees an initialized process group and uses it as is. With CUDA it changes nothing.
"""
import os
import subprocess
from datetime import timedelta

import torch
import torch.distributed as dist
from mmengine.config import Config

__all__ = ['prepare_distributed', 'cpu_distributed_env']


def cpu_distributed_env(launcher: str) -> dict:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` for ``launcher``.

    ``pytorch``: as set by ``torchrun`` (``tools/dist_train.sh``). ``slurm``: derived from
    ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and ``SLURM_NODELIST`` as mmengine does.
    """
    if launcher == 'pytorch':
        missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
                   if k not in os.environ]
        if missing:
            raise RuntimeError(f'--launcher pytorch needs {missing} in the environment; start '
                               f'the script with torchrun or tools/dist_train.sh')
        env = {k: os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}
        env['LOCAL_RANK'] = os.environ.get('LOCAL_RANK', env['RANK'])
        return env
    if launcher == 'slurm':
        node_list = os.environ['SLURM_NODELIST']
        addr = os.environ.get('MASTER_ADDR') or subprocess.getoutput(
            f'scontrol show hostname {node_list} | head -n1')
        return {
            'RANK': os.environ['SLURM_PROCID'],
            'WORLD_SIZE': os.environ['SLURM_NTASKS'],
            'LOCAL_RANK': os.environ.get('SLURM_LOCALID', '0'),
            'MASTER_ADDR': addr,
            'MASTER_PORT': os.environ.get('MASTER_PORT', '29500'),
        }
    raise ValueError(f'CPU distributed runs support the pytorch and slurm launchers, '
                     f'not {launcher!r}')


def prepare_distributed(cfg: Config, launcher: str) -> bool:
    """Make ``launcher`` work without CUDA; returns True if it initialized a CPU process group.

    Modifies ``cfg`` in place: ``env_cfg.dist_cfg.backend = 'gloo'`` and a DDP wrapper with
    ``device_ids=None`` (unless the config already sets ``model_wrapper_cfg``).
    """
    if launcher == 'none' or torch.cuda.is_available() or dist.is_initialized():
        return False
    env = cpu_distributed_env(launcher)
    os.environ.update(env)
    timeout = cfg.get('env_cfg', {}).get('dist_cfg', {}).get('timeout', 1800)
    dist.init_process_group(backend='gloo', rank=int(env['RANK']),
                            world_size=int(env['WORLD_SIZE']),
                            timeout=timedelta(seconds=timeout))
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    if cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    return True
