"""The zygote: a fork of the caller that forks the workers (start_method="zygote").

Booting a fork server is a fresh interpreter and its imports (~150 ms on a small VM, paid by
every short program); forking from the caller takes milliseconds, but a replacement worker
is started by the collector thread, and forking a process that has threads can copy a held
lock into the child. The zygote is forked once, when the Batcher starts, before any of its
threads exist; it stays single-threaded and forks every worker, first ones and
replacements, from that same state.

    caller (Pool.start)                              zygote (_serve, one thread)
    launch(i, [item_r, drain_r, result_w]) ==fds==>  fork -> worker: target(i, conns, *args)
    ZygoteProcess(pid, pidfd)             <==fd===   pid, and a pidfd opened before any reap
    join(): pidfd readable, then          <=======   (pid, exit code) once it reaped the child

A pidfd names one process for good: kill() through it never hits a reused pid. The zygote
exits when the caller asks it to (close()), closes its socket, or dies (a pidfd of the
caller, watched with the socket). Not on end of file alone: any process forked from the
caller later (another Batcher's zygote or fork workers, the user's own fork children)
holds a copy of the caller's end of the socket, and the zygote would wait for those. Ended
by the caller's death or by the end of its socket with no EXIT (an exec), it removes the
caller's shared-memory segments (shm.py): the caller can use them no more.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from . import shm

_LAUNCH = struct.Struct("i")  # a worker's index, or EXIT
EXIT = -1
_REPLY = struct.Struct("cii")  # b"P", pid, 0 (a pidfd attached) | b"X", pid, exit code


def available() -> bool:
    """fork, pidfds and fd passing: Linux 5.3+ with Python 3.9+."""
    return (hasattr(os, "fork") and hasattr(os, "pidfd_open")
            and hasattr(signal, "pidfd_send_signal") and hasattr(socket, "send_fds"))


def single_threaded() -> bool:
    """No other thread in this process, Python's or C's (a BLAS pool, a watchdog)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1]) == 1
    except (OSError, ValueError):
        pass
    return threading.active_count() == 1


class Zygote:
    """The caller's handle on its zygote process."""

    def __init__(self, target: Callable[..., None], args: tuple,
                 segments: tuple[str, ...] = ()) -> None:
        """Fork the zygote; ``segments``: shared memory it removes if the caller dies or
        its end of the socket closes with no EXIT."""
        for stream in (sys.stdout, sys.stderr):  # or the child prints what we buffered
            with contextlib.suppress(Exception):
                stream.flush()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A Ctrl-C before the zygote ignores SIGINT would kill it: hold it until then.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        caller = os.getpid()
        try:
            pid = os.fork()
            if pid == 0:
                _serve_forever(theirs, ours, caller, target, args, segments)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        self.pid = pid
        self._sock = ours
        self._lock = threading.Lock()  # one request or read at a time
        self._codes: dict[int, int] = {}  # pid -> exit code, read ahead of its join()

    def launch(self, index: int, fds: list[int]) -> ZygoteProcess:
        """Fork worker ``index`` with these pipe ends; raises OSError if it cannot."""
        with self._lock:
            socket.send_fds(self._sock, [_LAUNCH.pack(index)], fds)
            while True:
                kind, pid, _, pidfd = self._read()
                if kind == b"P":
                    return ZygoteProcess(self, pid, pidfd)

    def exit_code(self, pid: int) -> int:
        """The exit code of a worker whose pidfd is readable (it has exited)."""
        with self._lock:
            while pid not in self._codes:
                try:
                    self._read()
                except OSError:
                    return 255  # the zygote itself died: as multiprocessing says of a lost child
            return self._codes[pid]

    def _read(self) -> tuple[bytes, int, int, int | None]:
        msg, fds, _, _ = socket.recv_fds(self._sock, _REPLY.size, 1)
        if not msg:
            raise OSError("the zygote exited")
        kind, pid, value = _REPLY.unpack(msg)
        if kind == b"X":
            self._codes[pid] = value
        return kind, pid, value, fds[0] if fds else None

    def close(self) -> None:
        """End the zygote (its workers have been reaped) and reap it."""
        with contextlib.suppress(OSError):  # it is gone already
            self._sock.send(_LAUNCH.pack(EXIT))
        self._sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


class ZygoteProcess:
    """A worker the zygote forked: the parts of multiprocessing.Process the Pool uses."""

    def __init__(self, zygote: Zygote, pid: int, pidfd: int | None) -> None:
        if pidfd is None:
            raise OSError(f"the zygote sent no pidfd for worker pid {pid}")
        self.pid = pid
        self.sentinel = pidfd  # readable once the process has exited
        self._zygote = zygote
        self._code: int | None = None

    @property
    def exitcode(self) -> int | None:
        if self._code is None and self._exited(0):
            self._code = self._zygote.exit_code(self.pid)
        return self._code

    def join(self, timeout: float | None = None) -> None:
        if self._code is None and self._exited(timeout):
            self._code = self._zygote.exit_code(self.pid)

    def is_alive(self) -> bool:
        return self.exitcode is None

    def kill(self) -> None:
        if self.sentinel < 0:
            return
        with contextlib.suppress(ProcessLookupError, OSError):  # it has exited
            signal.pidfd_send_signal(self.sentinel, signal.SIGKILL)

    def close(self) -> None:
        """Release the pidfd (the worker has been reaped); kill() is a no-op after it."""
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1

    def _exited(self, timeout: float | None) -> bool:
        return _exits(self.sentinel, timeout)

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # AttributeError: no pidfd came
            self.close()


# -- the zygote process -------------------------------------------------------------------

def _serve_forever(sock: socket.socket, caller_end: socket.socket, caller: int,
                   target: Callable[..., None], args: tuple, segments: tuple[str, ...]) -> None:
    """The zygote's whole life: never returns, never runs the caller's atexit hooks."""
    code = 0
    try:
        _reset_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        caller_end.close()
        gc.freeze()  # the caller's objects copied here are never collected (nor their fds)
        try:
            caller_fd = os.pidfd_open(caller)
        except ProcessLookupError:  # the caller is gone already
            shm.unlink_all(segments)
            return
        try:
            asked = _serve(sock, caller_fd, target, args)
        except (BrokenPipeError, ConnectionResetError):  # a reply to a caller that died
            asked = False
        if not asked:  # the caller died, or closed its end (an exec): no one else will
            shm.unlink_all(segments)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _reset_signals() -> None:
    """The caller's signal handlers are not the zygote's, nor its workers'.

    A handler the caller set in Python would run here: a SIGCHLD handler that reaps every
    child would take the zygote's workers from it (their exit codes lost, the zygote ended
    by the ECHILD), SIGCHLD ignored would reap them in the kernel, and a SIGTERM handler
    meant to wind the caller down would keep the zygote alive. As in a fork server's
    workers, every handler is the default again; Ctrl-C is the caller's to handle."""
    signal.set_wakeup_fd(-1)  # the caller's event loop's, shared by the fork
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):  # SIGKILL, SIGSTOP, RT signals
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _serve(sock: socket.socket, caller: int, target: Callable[..., None],
           args: tuple) -> bool:
    """Fork workers until the caller dies or its end of the socket closes (False), or it
    asks for the end, or the socket fails while it lives (True: its segments are its own)."""
    children: dict[int, int] = {}  # pidfd -> pid
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(caller, select.POLLIN)  # readable once the caller has exited
    while True:
        for fd, _ in poller.poll():
            if fd == caller:
                return False
            if fd != sock.fileno():
                _reap(sock, poller, children, fd)
                continue
            try:
                msg, fds, _, _ = socket.recv_fds(sock, _LAUNCH.size, 3)
            except OSError:  # ENOBUFS, say: not an end of file
                return not _exits(caller, 1.0)
            if not msg:
                return False  # the caller closed its end, or died
            if _LAUNCH.unpack(msg)[0] == EXIT:
                return True
            pid = os.fork()
            if pid == 0:
                _run_worker(sock, children, caller, _LAUNCH.unpack(msg)[0], fds, target, args)
            for f in fds:
                os.close(f)
            pidfd = os.pidfd_open(pid)  # before any reap: the pid is still this child's
            children[pidfd] = pid
            poller.register(pidfd, select.POLLIN)
            socket.send_fds(sock, [_REPLY.pack(b"P", pid, 0)], [pidfd])


def _exits(pidfd: int, timeout: float | None) -> bool:
    """Whether the process of ``pidfd`` has exited, or does within ``timeout`` s (None:
    wait for it)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))


def _reap(sock: socket.socket, poller: Any, children: dict[int, int], pidfd: int) -> None:
    pid = children.pop(pidfd)
    poller.unregister(pidfd)
    os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    sock.send(_REPLY.pack(b"X", pid, os.waitstatus_to_exitcode(status)))


def _run_worker(sock: socket.socket, children: dict[int, int], caller: int, index: int,
                fds: list[int], target: Callable[..., None], args: tuple) -> None:
    """A forked worker: run ``target`` and exit with its code, as multiprocessing would."""
    code = 1
    try:
        sock.close()
        for pidfd in children:  # its siblings'
            os.close(pidfd)
        os.close(caller)
        gc.enable()
        items, drain, results = fds
        target(index, Connection(items, writable=False), Connection(drain, writable=False),
               Connection(results, readable=False), *args)
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
