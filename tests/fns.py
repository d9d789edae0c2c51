"""do() functions for the tests; top level so that every start method can import them."""

import ctypes
import os
import re
import signal
import threading
import time
import zlib


def double(batch):
    return {k: [v * 2 for v in vs] for k, vs in batch.items()}


def nothing(batch):
    return None


def with_pid(batch):
    """Each item's result: (worker pid, value) — shows where and in what order items ran."""
    pid = os.getpid()
    return {k: [(pid, v) for v in vs] for k, vs in batch.items()}


def batch_shape(batch):
    """Each item's result: the batch's (number of keys, number of items)."""
    n = sum(len(vs) for vs in batch.values())
    return {k: [(len(batch), n)] * len(vs) for k, vs in batch.items()}


def batch_start_and_size(batch):
    """Values are (index, payload); each item's result: (the smallest index in its batch,
    the batch's number of items): where the worker cut its batches."""
    indexes = [v[0] for vs in batch.values() for v in vs]
    shape = (min(indexes), len(indexes))
    return {k: [shape] * len(vs) for k, vs in batch.items()}


def raise_value_error(batch):
    raise ValueError(f"bad batch of {sum(map(len, batch.values()))}")


def kill_self(batch):
    os.kill(os.getpid(), signal.SIGKILL)


def exit_self(batch):
    os._exit(3)


def c_exit(batch):
    ctypes.CDLL(None).exit(4)


def sleep_forever(batch):
    threading.Event().wait()


def sys_exit(batch):
    raise SystemExit(5)


def returns_list(batch):
    return [1, 2, 3]


def returns_missing_key(batch):
    return {}


def returns_short(batch):
    return {k: vs[:-1] for k, vs in batch.items()}


def returns_extra_key(batch):
    out = double(batch)
    out["not-a-key"] = [1]
    return out


def returns_unpicklable(batch):
    return {k: [threading.Lock() for _ in vs] for k, vs in batch.items()}


class Unpicklable(Exception):
    def __init__(self):
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def raise_unpicklable(batch):
    raise Unpicklable()


def _explode():
    raise RuntimeError("cannot be rebuilt in the caller")


class BreaksOnLoad:
    def __reduce__(self):
        return (_explode, ())


def returns_breaks_on_load(batch):
    return {k: [BreaksOnLoad() for _ in vs] for k, vs in batch.items()}


def kill_on(bad):
    """do() that SIGKILLs its worker when the batch holds value ``bad``, else doubles."""

    def do(batch):
        if any(bad in vs for vs in batch.values()):
            os.kill(os.getpid(), signal.SIGKILL)
        return double(batch)

    return do


def digest(batch):
    """do() for large values: each value's length, crc32 and type name."""
    return {k: [(len(v), zlib.crc32(v), type(v).__name__) for v in vs]
            for k, vs in batch.items()}


def once_then(marker_dir, first, then=double):
    """do() that runs ``first`` on the very first call (across workers), then ``then``."""

    def do(batch):
        marker = os.path.join(marker_dir, "tried")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return then(batch)
        os.close(fd)
        return first(batch)

    return do


def wait_for_file(path, key=None):
    """do() that holds a batch (with ``key``, or any) until ``path`` exists: the test
    decides when it ends. A worker-side gate; the test itself waits on futures."""

    def do(batch):
        if key is None or key in batch:
            while not os.path.exists(path):
                time.sleep(0.01)
        return double(batch)

    return do


def init_state():
    return {"pid": os.getpid(), "factor": 10}


def use_state(batch, state):
    return {k: [v * state["factor"] for v in vs] for k, vs in batch.items()}


def init_fails():
    raise RuntimeError("no model here")


def _refuse_to_load(why):
    raise RuntimeError(why)


class LoadsOnlyInTheCaller:
    """Pickles, but raises when unpickled: a stand-in for what do() needs and a worker lacks
    (a module only the caller can import, a resource bound to the caller)."""

    def __reduce__(self):
        return _refuse_to_load, ("this object cannot be rebuilt in a worker",)


def needs_the_caller(thing):
    def do(batch):
        return double(batch) if thing is not None else None

    return do


def once_then_bad(first):
    """do() that runs ``first`` on batches holding key "bad", and doubles the others."""

    def do(batch):
        if "bad" in batch:
            return first(batch)
        return double(batch)

    return do


def announce_then_wait(fifo, gate, then=double):
    """do() that writes its pid to ``fifo`` when a batch starts, then waits for ``gate``
    and runs ``then``."""

    def do(batch):
        fd = os.open(fifo, os.O_WRONLY)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        while not os.path.exists(gate):
            time.sleep(0.01)
        return then(batch)

    return do


def hang_on(bad):
    """do() that hangs when the batch holds value ``bad``, else doubles."""

    def do(batch):
        if any(bad in vs for vs in batch.values()):
            threading.Event().wait()
        return double(batch)

    return do


def hold_gil_on(key, fifo):
    """do() that, for a batch holding ``key``, writes its pid to ``fifo`` and then runs a
    regex that backtracks for ages inside C without releasing the GIL (the worker's reader
    thread cannot drain its pipe); otherwise it returns the lengths of the values."""

    def do(batch):
        if key in batch:
            fd = os.open(fifo, os.O_WRONLY)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.close(fd)
            re.fullmatch(r"(a+)+b", "a" * 64)
        return {k: [len(v) for v in vs] for k, vs in batch.items()}

    return do


def grow_memory(batch):
    """do() that keeps 20 MB more per batch alive in its worker (a leak), and doubles."""
    _LEAK.append(bytearray(20 * 1024 * 1024))
    return with_pid(batch)


_LEAK = []


def slow_double(batch):
    """A little real work per batch, so a kill often lands inside do()."""
    time.sleep(0.002)
    return double(batch)


def init_announce_then_wait(fifo, gate):
    """init() that writes its pid to ``fifo``, then waits for ``gate`` to exist."""

    def init():
        fd = os.open(fifo, os.O_WRONLY)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        while not os.path.exists(gate):
            time.sleep(0.01)
        return init_state()

    return init


def fifo_reader(path):
    """Open a FIFO for reading that never sees EOF between two writers (O_RDWR, Linux)."""
    return open(os.open(path, os.O_RDWR), encoding="ascii")


def join_cgroup(path):
    """init() that moves its worker into the memory cgroup at ``path``."""

    def init():
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        return None

    return init


def limit_address_space(nbytes):
    """init() that caps its worker's address space (RLIMIT_AS)."""

    def init():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))

    return init


def hog_on(key):
    """do(batch, state) that allocates without limit when ``key`` is in the batch."""

    def do(batch, state):
        if key in batch:
            hoard = []
            while True:
                hoard.append(b"x" * (32 * 1024 * 1024))
        return double(batch)

    return do


def sleep_per_item(batch):
    """2 ms of wall time per item: a cost the pacer can learn, whatever the CPU's speed."""
    time.sleep(0.002 * sum(map(len, batch.values())))
    return double(batch)


def crash_first_when_gated(fifo, gate, marker_dir, then=double):
    """do() whose very first call (across workers) writes its pid to ``fifo``, waits for
    ``gate`` and then exits the worker; every later call runs ``then``."""
    first = announce_then_wait(fifo, gate)

    def crash(batch):
        first(batch)
        os._exit(3)

    return once_then(marker_dir, crash, then)


# -- per-item functions (mpbatch.peritem.PerItem) --------------------------------------------

def square_unless_bad(x):
    """One item: its square; raises for 13, exits the worker for -1, and returns an
    unpicklable result for 'lock'."""
    if x == 13:
        raise ValueError("unlucky 13")
    if x == -1:
        os._exit(9)
    if x == "lock":
        return threading.Lock()
    return x * x


def scaled(x, state):
    return x * state["factor"]


def double_rows(batch):
    """do() for rows (dicts with "n"): each row's n doubled."""
    return {k: [row["n"] * 2 for row in rows] for k, rows in batch.items()}


def double_n(row):
    """One row: n doubled; raises on n == 13."""
    if row["n"] == 13:
        raise ValueError("unlucky 13")
    return row["n"] * 2


def slow_n(row):
    """One row: n, after ~20 ms (a job long enough to kill or interrupt)."""
    time.sleep(0.02)
    return row["n"]


def fails_unless_fixed(row):
    """One row: n; raises unless the file named by $MPBATCH_FIXED exists (replay fixes it)."""
    if not os.path.exists(os.environ.get("MPBATCH_FIXED", "/nonexistent")):
        raise RuntimeError("not fixed yet")
    return row["n"]


def with_pid_gated(path, key):
    """with_pid() that holds every batch with ``key`` until ``path`` exists."""

    def do(batch):
        if key in batch:
            while not os.path.exists(path):
                time.sleep(0.01)
        return with_pid(batch)

    return do


def with_pid_held_on(bad, fifo, gate):
    """with_pid() that, for a batch holding value ``bad``, is announce_then_wait()'s."""
    held = announce_then_wait(fifo, gate, then=with_pid)

    def do(batch):
        if any(bad in vs for vs in batch.values()):
            return held(batch)
        return with_pid(batch)

    return do


def digest_and_add_a_key(batch):
    """do() that adds a key of its own to the batch it was given, with a result for it."""
    batch["added"] = [b"x"]
    return digest(batch)


def rename_keys(batch):
    """do() that gives every item of its batch a new key, and results under those keys."""
    renamed = {f"new-{k}": vs for k, vs in batch.items()}
    batch.clear()
    batch.update(renamed)
    return {k: [v * 2 for v in vs] for k, vs in batch.items()}


def sleep_then_pid(batch):
    """Values are (index, seconds): sleep that long per item; each result is (pid, index)."""
    time.sleep(sum(v[1] for vs in batch.values() for v in vs))
    return {k: [(os.getpid(), v[0]) for v in vs] for k, vs in batch.items()}


def change_values(batch):
    """do() that replaces its batch's values in place; each result is the old value."""
    results = {k: list(vs) for k, vs in batch.items()}
    for vs in batch.values():
        vs[:] = [f"changed-{v}" for v in vs]
    return results


def wait_or_mark(batch):
    """Values are (index, action, path): "wait" for the file at path to exist (up to 20 s
    a batch; the result says whether it came), "mark" creates it, after 5 ms of work;
    anything else is 5 ms of work. Each result is (pid, index, what happened)."""
    out = {}
    deadline = time.monotonic() + 20
    for key, values in batch.items():
        out[key] = []
        for index, action, path in values:
            what = "worked"
            if action == "wait":
                while not os.path.exists(path) and time.monotonic() < deadline:
                    time.sleep(0.001)
                what = "released" if os.path.exists(path) else "timed out"
            else:
                time.sleep(0.005)
                if action == "mark":
                    with open(path, "a"):
                        pass
            out[key].append((os.getpid(), index, what))
    return out
