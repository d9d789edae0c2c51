"""Shared-memory segments without the resource tracker (mpbatch/shm.py)."""

import os
import secrets
import types

import pytest

from mpbatch import shm
from mpbatch.shm import Segment, unlink


def _name():
    return f"mpbatch_{os.getpid()}_{secrets.token_hex(4)}_test"


def test_a_segment_is_shared_by_name_and_removed_once():
    name = _name()
    made = Segment(name, size=4096, create=True)
    seen = Segment(name)
    try:
        made.buf[:5] = b"hello"
        assert seen.size == 4096 and bytes(seen.buf[:5]) == b"hello"
        with pytest.raises(FileExistsError):
            Segment(name, size=4096, create=True)
    finally:
        seen.close()
        made.close()
        made.close()  # a second close does nothing
        made.unlink()
    assert not os.path.exists(f"/dev/shm/{name}")
    unlink(name)  # gone already (another process removed it first): no error
    with pytest.raises(FileNotFoundError):
        Segment(name)


def test_a_segment_is_the_users_alone():
    made = Segment(_name(), size=4096, create=True)
    try:
        assert os.stat(f"/dev/shm/{made.name}").st_mode & 0o777 == 0o600
    finally:
        made.close()
        made.unlink()


def test_a_segment_that_cannot_be_mapped_is_removed(monkeypatch):
    """A failure after shm_open (no address space for the mapping) leaves no name behind
    and no descriptor open."""
    def no_room(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    name = _name()
    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(shm, "mmap", types.SimpleNamespace(mmap=no_room))
    with pytest.raises(OSError, match="Cannot allocate memory"):
        Segment(name, size=4096, create=True)
    assert not os.path.exists(f"/dev/shm/{name}")
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_segment_needs_a_size():
    with pytest.raises(ValueError, match="a segment needs a size > 0, not 0"):
        Segment(_name(), create=True)
