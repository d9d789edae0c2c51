"""Shared-memory segments without the resource tracker (mpbatch/shm.py)."""

import os
import secrets

import pytest

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


def test_a_segment_needs_a_size():
    name = _name()
    with pytest.raises(ValueError, match="size > 0, not 0"):
        Segment(name, create=True)
    assert not os.path.exists(f"/dev/shm/{name}")
