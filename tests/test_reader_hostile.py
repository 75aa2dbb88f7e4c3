"""The shard reader against malformed shards: it never crashes, never hangs, and says what it skipped.

Hypothesis feeds random bytes and mutated real tars (flipped bytes in headers and data,
truncations, PAX records that do not advance, names that are not UTF-8, labels outside
the class list). Every case must end within a time bound, in batches of the readable
samples or in the one error a set with nothing readable gets (ShardSetError).
"""

from __future__ import annotations

import contextlib
import io
import signal
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shards import ShardSetError, ShardStream, make_loader, open_shard_set
from shards.tario import TarFormatError, iter_members
from tests.conftest import write_shard_set

SECONDS = 5  # per case: a hang fails the case instead of the suite's 10-minute timeout


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    def alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _identity(image):
    return np.asarray(image.resize((4, 4)), dtype=np.uint8)


@pytest.fixture(scope="module")
def good_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A set of one shard of 3 samples, and that shard's bytes to mutate."""
    out = tmp_path_factory.mktemp("good")
    write_shard_set(out, [3], classes=("neutral", "happiness"), size=8)
    return out, (out / "shard-000000.tar").read_bytes()


def _pax_member(records: bytes) -> bytes:
    """A PAX extended header ('x') whose body is `records`, as raw tar blocks."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = len(records)
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    return header + records + bytes(-len(records) % 512)


def _read(tmp_path: Path, shard: bytes, batch_size: int = 2) -> list[dict]:
    """Everything the reader gives for a set whose only shard holds `shard`; sizes.json still says 3."""
    (tmp_path / "shard-000000.tar").write_bytes(shard)
    stream = ShardStream(open_shard_set(str(tmp_path)), rank=0, world_size=1, loader_workers=0,
                         batch_size=batch_size, transform=_identity, interleave=2)
    return list(make_loader(stream))


def _copy_set(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())


mutations = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("pax"), st.binary(max_size=64)),
    st.tuples(st.just("random"), st.binary(max_size=4096)),
)


def _mutate(shard: bytes, mutation: tuple) -> bytes:
    kind, arg = mutation
    if kind == "flip":
        data = bytearray(shard)
        for position, value in arg:
            data[position % len(data)] = value
        return bytes(data)
    if kind == "truncate":
        return shard[: arg % len(shard)]
    if kind == "pax":
        return _pax_member(arg) + shard
    return arg


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=mutations)
def test_a_mutated_shard_never_crashes_or_hangs_the_reader(mutation, good_set, tmp_path_factory) -> None:
    src, shard = good_set
    directory = tmp_path_factory.mktemp("case")
    _copy_set(src, directory)
    with time_bound(SECONDS):
        try:
            batches = _read(directory, _mutate(shard, mutation))
        except ShardSetError as exc:
            assert "no readable sample" in str(exc)
        else:
            assert batches and all(len(b["key"]) == 2 for b in batches)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=8192))
def test_the_tar_reader_ends_or_raises_its_own_error_on_any_bytes(data: bytes) -> None:
    with time_bound(SECONDS):
        with contextlib.suppress(TarFormatError):
            for _ in iter_members(io.BytesIO(data), "random.tar"):
                pass


@pytest.mark.parametrize("case, readable", [
    ("non-utf8 name", 2), ("huge size field", 2), ("label outside classes", 2), ("zero-length PAX record", 0),
])
def test_each_known_fault_is_a_counted_skip_naming_the_shard(case: str, readable: int, good_set, tmp_path: Path,
                                                             caplog) -> None:
    """A fault in the first sample costs that sample; the others start at their recorded offsets. A PAX
    record put in front shifts every offset, and every piece then meets it reading from the start."""
    src, shard = good_set
    _copy_set(src, tmp_path)
    data = bytearray(shard)
    if case == "non-utf8 name":
        data[0] = 0xFF
    elif case == "huge size field":
        data[124:136] = b"77777777777\0"  # 8 GiB, past the end of the file
    elif case == "zero-length PAX record":
        data = bytearray(_pax_member(b"0 x=\n") + shard)
    else:
        with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i, (member, body) in enumerate(members):
                body = b"7" if i == 0 else body  # the first sample's cls
                member.size = len(body)
                tar.addfile(member, io.BytesIO(body))
        data = bytearray(buf.getvalue())
    with time_bound(SECONDS):
        try:
            batches = _read(tmp_path, bytes(data), batch_size=1)
        except ShardSetError as exc:
            assert "no readable sample" in str(exc)
            batches = []
    assert len({k for b in batches for k in b["key"]}) == readable
    assert "shard-000000.tar" in caplog.text and "skipping" in caplog.text
    if case == "label outside classes":
        assert "class index 7 is outside the set's 2 classes" in caplog.text
    else:
        assert "shard-000000.tar @ " in caplog.text  # where in the shard it broke
