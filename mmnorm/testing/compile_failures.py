# Copyright (c) mmnorm contributors. All rights reserved.
"""torch.compile backends that fail at each stage a real compiler can (for the fallback tests
and tools/gpu_check.py): the forward compile, the backward compile (AOTAutograd compiles it
lazily, at the first backward), and the first run of a compiled graph."""

__all__ = ['failing_compiler', 'backward_fails', 'first_run_fails', 'FAILURES']


def failing_compiler(gm, example_inputs):
    """A backend (or AOTAutograd compiler) that raises: the compile fails."""
    raise RuntimeError('injected: the compiler failed')


def backward_fails():
    """AOTAutograd with a working forward and a failing backward compiler: the backward
    compiles lazily, at the first backward of the graph."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    return aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                        bw_compiler=failing_compiler)


def first_run_fails(gm, example_inputs):
    """Compiles, then fails when the graph first runs (as Triton out of resources does)."""

    def run(*args):
        raise RuntimeError('injected: the kernel failed to launch')

    return run


#: Stage -> the backend that fails there (``backward_fails`` builds one).
#:
#: :meta hide-value:
FAILURES = {'forward compile': lambda: failing_compiler,
            'backward compile': backward_fails,
            'first run': lambda: first_run_fails}
