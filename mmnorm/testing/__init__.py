# Copyright (c) mmnorm contributors. All rights reserved.
"""What the test suite and the prepared GPU check (``tools/gpu_check.py``, also run as
``mim run mmnorm gpu_check``) share, shipped in the package so that the check runs from an
installed wheel. It needs torch only (no OpenMMLab package, no pytest):

- :mod:`mmnorm.testing.oracles`: independent float64 reference implementations of the papers'
  equations, in plain torch ops on the full tensor (no code shared with the layers);
- :mod:`mmnorm.testing.layers`: every normalizer configuration the portability checks cover, with
  non-trivial parameters, inputs, one training step and the float64 oracle of a layer;
- :mod:`mmnorm.testing.compile_failures`: ``torch.compile`` backends that fail at each stage;
- :mod:`mmnorm.testing.host_sync`: fail on any host-device synchronization, on every device;
- :mod:`mmnorm.testing.distributed`: real multi-process runs (gloo on the CPU, NCCL or gloo on
  GPUs).

Nothing here is imported by ``import mmnorm``.
"""
