"""Child processes that never outlive the process that started them, even one killed outright."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def dies_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A `preexec_fn` after which the child gets `sig` when its parent dies (Linux prctl).

    The signal follows the *thread* that started the child: start such children from the main
    thread. Elsewhere (no prctl) the parent's own shutdown is the only stop.
    """
    return functools.partial(_set_parent_death_signal, int(sig))


def _set_parent_death_signal(sig: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, sig)
