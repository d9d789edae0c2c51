"""Misbehaving items, results, exceptions and do() callables for the crash catalogue.

Top level only (classes whose instances pickle by reference), so that every start method,
and plain pickle in ProcessPoolExecutor (benchmarks/ppe_catalogue.py), can import them.

Each way to misbehave is a ``how``:
    "raise"   raise RuntimeError("poison: <where>")
    "exit"    os._exit(EXIT_CODE)
    "c-exit"  C exit(C_EXIT_CODE) through ctypes (runs C atexit handlers, skips Python's)
    "segv"    faulthandler._sigsegv(): a real SIGSEGV
    "hang"    wait forever
    "sys-exit"   raise SystemExit("poison: <where>")
    "interrupt"  raise KeyboardInterrupt("poison: <where>")
"""

import contextlib
import ctypes
import faulthandler
import multiprocessing
import os
import threading

EXIT_CODE = 7
C_EXIT_CODE = 8
BAD = -1  # the culprit value of rows whose do() (or its result) misbehaves


_IMPORTED_BY = os.getpid()


def in_a_worker():
    """Spawned or forkserver children know their parent; forks (fork, zygote) keep the
    caller's import of this module, under another pid."""
    return multiprocessing.parent_process() is not None or os.getpid() != _IMPORTED_BY


def misbehave(how, where):
    """Do ``how`` now; ``where`` goes into the message of "raise"."""
    if how == "raise":
        raise RuntimeError(f"poison: {where}")
    if how == "exit":
        os._exit(EXIT_CODE)
    if how == "c-exit":
        ctypes.CDLL(None).exit(C_EXIT_CODE)
    if how == "segv":
        with contextlib.suppress(ImportError, ValueError, OSError):
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file per row
        faulthandler.disable()  # no traceback dump (fork inherits pytest's handler)
        faulthandler._sigsegv()
    if how == "hang":
        threading.Event().wait()
    if how == "sys-exit":
        raise SystemExit(f"poison: {where}")
    if how == "interrupt":
        raise KeyboardInterrupt(f"poison: {where}")
    raise ValueError(f"unknown way to misbehave: {how!r}")


def double_all(batch):
    """The do() of rows where only the item itself misbehaves."""
    return {k: [v * 2 for v in vs] for k, vs in batch.items()}


# -- items and results that misbehave on (un)pickling ---------------------------------------

def _load_poison(how, home, where):
    if os.getpid() != home:
        misbehave(how, where)
    item = Poison(how, where)
    item.home = home
    return item


class Poison:
    """Pickles anywhere; misbehaves when unpickled in a process other than the one that made it.

    As an item (made in the caller), it blows up in the worker that unpickles it; as a
    result of do() (made in the worker), it blows up in the caller.
    """

    def __init__(self, how, where):
        self.how = how
        self.where = where
        self.home = os.getpid()

    def __reduce__(self):
        return (_load_poison, (self.how, self.home, self.where))

    def __repr__(self):
        return f"Poison({self.how!r})"


def poison_item(how):
    return Poison(how, "item unpickled in a worker")


class PicklesBadly:
    """A result of do() whose pickling misbehaves in a child process (the worker).

    In the main process it pickles as itself, so a test may still look at it.
    """

    def __init__(self, how):
        self.how = how

    def __reduce__(self):
        if in_a_worker():
            misbehave(self.how, "result pickled in the worker")
        return (PicklesBadly, (self.how,))


class Unpicklable(Exception):
    """An exception that cannot be pickled: it holds a lock."""

    def __init__(self):
        super().__init__("holds a lock")
        self.lock = threading.Lock()


class BadStr(Exception):
    """An exception whose str() raises: only its type can describe it."""

    def __str__(self):
        raise RuntimeError("str() of BadStr")


# -- do() callables: misbehave on batches that hold BAD, double the rest ---------------------

class CrashingDo:
    """do() that misbehaves (``how``) when its batch holds BAD; doubles other batches."""

    def __init__(self, how):
        self.how = how

    def __call__(self, batch):
        if any(BAD in vs for vs in batch.values()):
            misbehave(self.how, "do() got BAD")
        return double_all(batch)


class CrashOnKey:
    """do() that misbehaves (``how``) when its batch holds ``key``; doubles other batches."""

    def __init__(self, how, key):
        self.how = how
        self.key = key

    def __call__(self, batch):
        if self.key in batch:
            misbehave(self.how, f"do() got key {self.key!r}")
        return double_all(batch)


class BadResultDo:
    """do() whose result for BAD is ``make(how)``; the other results are doubled values."""

    def __init__(self, make, how):
        self.make = make
        self.how = how

    def __call__(self, batch):
        return {k: [self.make(self.how) if v == BAD else v * 2 for v in vs]
                for k, vs in batch.items()}


def poison_result(how):
    return Poison(how, "result unpickled in the caller")


class RaisingDo:
    """do() that raises ``kind()`` when its batch holds BAD; doubles other batches."""

    def __init__(self, kind):
        self.kind = kind

    def __call__(self, batch):
        if any(BAD in vs for vs in batch.values()):
            raise self.kind()
        return double_all(batch)


# -- user objects the collector thread meets: values re-sent, keys in messages ---------------

def _on_a_caller_thread():
    """True off the main thread of the caller (the collector thread); the main thread adds
    items and a worker runs do() on its main thread: there these objects behave."""
    return threading.current_thread() is not threading.main_thread()


class PicklesOnTheMainThread:
    """A value that pickles at add() (the caller's main thread) and misbehaves (``how``)
    when pickled on any other thread: the collector re-sending it for a retry."""

    def __init__(self, how):
        self.how = how

    def __reduce__(self):
        if _on_a_caller_thread():
            misbehave(self.how, "value pickled by the collector")
        return (PicklesOnTheMainThread, (self.how,))

    def __repr__(self):
        return f"PicklesOnTheMainThread({self.how!r})"


class TouchyKey:
    """A key that hashes, pickles and compares by ``name``; its repr() and == misbehave
    (``how``) off the main thread: in the collector thread's messages and groupings."""

    def __init__(self, name, how):
        self.name = name
        self.how = how

    def __hash__(self):
        return hash(self.name)

    def __eq__(self, other):
        if _on_a_caller_thread():
            misbehave(self.how, "key compared by the collector")
        return isinstance(other, TouchyKey) and other.name == self.name

    def __repr__(self):
        if _on_a_caller_thread():
            misbehave(self.how, "key repr()'d by the collector")
        return f"TouchyKey({self.name!r})"

    def __reduce__(self):
        return (TouchyKey, (self.name, self.how))


class ComparesBadlyInWorkers:
    """A key that hashes by ``name`` everywhere and whose == raises in a worker, where
    items are grouped by key: two such keys that are equal meet there."""

    def __init__(self, name):
        self.name = name

    def __hash__(self):
        return hash(self.name)

    def __eq__(self, other):
        if in_a_worker():
            misbehave("raise", "key compared in a worker")
        return isinstance(other, ComparesBadlyInWorkers) and other.name == self.name

    def __repr__(self):
        return f"ComparesBadlyInWorkers({self.name!r})"


def one_item(do, key, value):
    """ProcessPoolExecutor's view of ``do``: one item, one call (benchmarks/ppe_catalogue.py)."""
    return do({key: [value]})[key][0]
