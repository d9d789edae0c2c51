"""Calls for tests/test_executor.py; top level, so that every start method can import them."""

import os
import pickle
import signal
import sys
import threading
import time


def mul(x, y):
    return x * y


def capture(*args, **kwargs):
    return args, kwargs


def identity(x):
    return x


def pid(_=None):
    return os.getpid()


def touch(path):
    with open(path, "w"):
        pass


def sleep_and_print(seconds, message):
    time.sleep(seconds)  # the work: a call still running when the script ends
    print(message, flush=True)


def raise_runtime_error():
    raise RuntimeError(123)  # a comment the remote traceback must show


def timeout_on_one(x):
    """Raises TimeoutError of its own for 1: not map()'s timeout."""
    if x == 1:
        raise TimeoutError("the call's own")
    return x


def wait_for_file(path, value=None):
    """Holds its worker until ``path`` exists (a gate the test opens), then returns
    ``value``."""
    while not os.path.exists(path):
        time.sleep(0.005)
    return value


def announce_then_wait(fifo, gate, value=None):
    """Writes its pid to ``fifo`` when it starts, then waits for ``gate``; returns
    ``value``. The test knows the call runs, and decides when it ends."""
    fd = os.open(fifo, os.O_WRONLY)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    return wait_for_file(gate, value)


def gated(value, path=None):
    """``value``; with ``path``, once ``path`` exists."""
    return value if path is None else wait_for_file(path, value)


def square_unless(x, exit_on=None, kill_on=None, segv_on=None, raise_on=None, hang_on=None):
    """x * x, except for the poison values: one exits the worker (os._exit), one
    SIGKILLs it, one segfaults, one raises, one hangs."""
    if x == exit_on:
        os._exit(7)
    if x == kill_on:
        os.kill(os.getpid(), signal.SIGKILL)
    if x == segv_on:
        segfault()
    if x == raise_on:
        raise ValueError(f"bad value {x}")
    if x == hang_on:
        threading.Event().wait()
    return x * x


def segfault():
    import faulthandler

    faulthandler.disable()
    faulthandler._sigsegv()


def unpicklable_result():
    return threading.Lock()


# -- initializer ------------------------------------------------------------------------------

INITIALIZER_STATUS = "uninitialized"


def init(status):
    global INITIALIZER_STATUS
    INITIALIZER_STATUS = status


def get_init_status():
    return INITIALIZER_STATUS


def init_fail(log_path):
    """An initializer that raises, after sending the worker's concurrent.futures log to
    ``log_path`` (the test's caplog cannot see a worker's log)."""
    import logging

    logging.getLogger("concurrent.futures").addHandler(logging.FileHandler(log_path))
    raise ValueError("error in initializer")


class Thing:
    """A plain object: for tests of what the executor keeps alive."""

    def method(self):
        return None


def make_thing(_):
    return Thing()


# -- objects that misbehave when pickled or unpickled (CPython's test_deadlock.py) ----------

def _exit_now():
    sys.exit(1)


def _segfault_now():
    segfault()


def _raise_unpickling_error():
    raise pickle.UnpicklingError("error at unpickling")


class ExitAtUnpickle:
    def __reduce__(self):
        return _exit_now, ()


class ErrorAtUnpickle:
    def __reduce__(self):
        return _raise_unpickling_error, ()


class CrashAtUnpickle:
    def __reduce__(self):
        return _segfault_now, ()


class ErrorAtPickle:
    def __reduce__(self):
        raise pickle.PicklingError("error at pickling")


def return_instance(cls):
    return cls()


def sys_exit():
    sys.exit(1)


class ExitAtPickle:
    def __reduce__(self):
        sys.exit(1)


class CrashAtPickle:
    def __reduce__(self):
        segfault()
