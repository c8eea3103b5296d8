"""Out-of-memory recovery: halve the batch and retry instead of dying."""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Callable, TypeVar

from moeaudit.errors import MoeAuditError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Messages of allocation failures that torch raises as plain RuntimeError (CPU allocator, older CUDA paths).
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(err: BaseException) -> bool:
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _OOM_MESSAGES)


def _release_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # no C library to load (Windows: CDLL(None) is refused)
        return None


def trim_heap() -> None:
    """Hand the free pages of the C heap back to the system (glibc's ``malloc_trim(0)``; a no-op elsewhere).

    PyTorch's CPU tensors come from ``malloc``. Once a freed block larger than glibc's mmap threshold has
    been unmapped, the threshold rises to that block's size (up to 32 MiB), so later blocks of up to that
    size (a call's logits, a layer's states) are carved from the heap, and the heap's freed pages stay
    resident. Over the hundreds of calls of one window's census the resident set then creeps above what the
    live tensors need (on the benchmark's Jamba shape, from 1.5x to 2.2x the clean pass's). Trimming returns
    those pages; the tensors and their contents are untouched. It took 0.4-2.6 ms per call on the
    benchmark's heap, so the engine calls it between MoE layers, not between calls.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def with_halving(run: Callable[[int], T], size: int, what: str) -> tuple[T, int]:
    """Call ``run(size)``; on out-of-memory halve ``size`` and retry. Returns the result and the size used.

    Parameters
    ----------
    run : callable(int) -> T
        Does the whole piece of work with the given batch size (it must not keep partial results).
    size : int
        The batch size to try first.
    what : str
        The setting's name for messages, e.g. ``"batch_size"``.
    """
    while True:
        try:
            return run(size), size
        except Exception as err:  # noqa: BLE001 — only allocation failures are retried
            if not is_out_of_memory(err):
                raise
            _release_cached_memory()
            if size == 1:
                raise MoeAuditError(f"out of memory even with {what} = 1; use a shorter --max-len, a smaller "
                                    "--dtype (bfloat16) or a device with more memory") from None
            logger.warning("out of memory with %s = %d; retrying with %d", what, size, size // 2)
            size //= 2
