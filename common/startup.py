"""A process's start-up (torch, transformers, gRPC, a model) without the cyclic collector.

Importing torch and transformers creates a few million long-lived Python objects. While
they load, CPython's cyclic garbage collector walks the growing heap again and again, and
at exit it walks all of it once more: together about a third of the CPU a ``sottovoce
client`` spends before its first answer and after its last (seconds per process; every
holder of a simulation and every CLI test is such a process). None of those objects is
garbage, so the collector is off while they load, and what was loaded is then moved to the
permanent generation (:func:`gc.freeze`) where neither later collections nor the one at exit
walk it. The collector is on again for the run itself, whose garbage it does collect.
"""

from __future__ import annotations

import gc
import importlib
import pickle
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def start_up() -> Iterator[None]:
    """Run the block (heavy imports, model loading) with the collector off, then freeze.

    For the entry points that own their process (the CLI commands, the baseline's own
    process); a library call in someone else's process should not change its collector.
    The collector's previous on/off state is restored, also when the block raises.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


SERVING_YOUNG_THRESHOLD = 50_000
"""Allocations between two collections of the youngest generation while serving (CPython's
default is 700)."""


def collect_less_while_serving() -> None:
    """Collect the young generations every :data:`SERVING_YOUNG_THRESHOLD` allocations
    instead of every 700, for a process that serves the Coordinator from now on.

    Each answer allocates a few hundred short-lived objects (messages, coroutines, futures)
    that reference counting frees; at the default threshold the collector would walk the
    young generations every few answers, about a tenth of the served coordinator's CPU
    (bench/bench_load.py at 1,000 holders). Cycles are still collected, some 70 times less
    often, so garbage held in cycles stays bounded by the same count of young objects.
    Only for a process the caller owns (``sottovoce server``), like :func:`start_up`.
    """
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(SERVING_YOUNG_THRESHOLD, middle, oldest)


def call_started_up(target: str, call: bytes) -> None:
    """Import ``target`` (``"module:function"``), unpickle its arguments ``call``, both in
    :func:`start_up`, then call it: the target of a process started with ``spawn``.

    A spawned process unpickles its target and arguments, importing their modules (torch,
    transformers), before any code of its own runs, so with the collector on. Handed this
    light function, the target's name and the pickled arguments instead, it imports them
    without the collector and frozen, like a CLI process.
    """
    with start_up():
        module, _, name = target.partition(":")
        function = getattr(importlib.import_module(module), name)
        args = pickle.loads(call)  # from the parent process, as multiprocessing's own are
    function(*args)
