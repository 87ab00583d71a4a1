"""Programmatic dependent launch (PDL, compute capability 9.0 and later) for decode's chain of kernels.

A decode step is ~500 launches in a row; each kernel ramps up (launch, first loads in flight) only
after the one before it has drained. With PDL a kernel is launched while its predecessor still runs:
its programs become resident, then block in ``griddepcontrol.wait`` until the predecessor has
finished and its writes are visible, so the launch and the programs' start overlap the
predecessor's tail. Every kernel that takes part calls ``prior_done`` first: it waits, then lets its
own dependents launch.

Rules that keep this exact:

* a kernel launched with ``launch_pdl`` must call ``prior_done`` before any load of data another
  kernel writes and before any store (a store could overwrite what its predecessor still reads);
* the wait covers the whole chain: kernel n finishes only after its own wait returned, so kernel n + 1's
  wait implies every earlier kernel has finished. A kernel launched without PDL (a PyTorch op) starts
  after its predecessor has finished, as usual, and its successor's wait waits for it in turn.

``launch_options(t)`` gives the keywords of a launch on ``t``'s device: the ``PDL`` constexpr each such
kernel takes and, when on, ``launch_pdl``. ``disabled()`` turns PDL off for what is launched or
captured inside it (benchmarks compare both in one process; ``LESSISMORE_PDL=0`` turns it off for the
process).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

_state = {"on": os.environ.get("LESSISMORE_PDL", "1") != "0"}


@functools.lru_cache(maxsize=None)
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels launched now on ``t``'s device use PDL: a CUDA tensor on a GPU of compute
    capability >= 9.0, not under Triton's interpreter, and not turned off."""
    if not (_state["on"] and t.is_cuda) or INTERPRETED:
        return False
    return _capable(t.device.index if t.device.index is not None else torch.cuda.current_device())


def launch_options(t: torch.Tensor) -> dict:
    """Keywords for a launch on ``t``'s device: ``kernel[grid](..., **launch_options(t))`` sets the
    kernel's ``PDL`` constexpr and, when on, launches it with PDL."""
    return {"PDL": True, "launch_pdl": True} if enabled(t) else {"PDL": False}


@contextlib.contextmanager
def disabled():
    """PDL off for the kernels launched (or graphs captured) inside the block."""
    before = _state["on"]
    _state["on"] = False
    try:
        yield
    finally:
        _state["on"] = before


@triton.jit
def prior_done(PDL: tl.constexpr):
    """Wait until the kernels before this one have finished (their writes visible), then let the
    next kernel launch. A no-op without PDL."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


# Kernels defined while TRITON_INTERPRET=1 run in the interpreter, which has no PDL.
INTERPRETED = not isinstance(prior_done, triton.runtime.JITFunction)


__all__ = ["enabled", "launch_options", "disabled", "prior_done"]
