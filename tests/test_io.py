"""hemaseg.io: atomic writes keep the old file or the new one, never half; permissions follow the umask."""

import os
import stat
from pathlib import Path

import pytest

from hemaseg import io as hio
from hemaseg.io import atomic_write, atomic_write_bytes, remove_stale_temps


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask,expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_permissions_the_umask_gives(tmp_path, umask, expected):
    """Read at write time, not when hemaseg.io was imported: a umask set later (by a service wrapper,
    a test, a library) still decides."""
    old = tmp_path / "old.bin"
    old.write_bytes(b"x")
    old.chmod(0o600 if expected != 0o600 else 0o644)  # an overwritten file gets the umask's mode too
    previous = os.umask(umask)
    try:
        new = atomic_write_bytes(tmp_path / "sub" / "new.bin", b"data")
        atomic_write_bytes(old, b"y")
    finally:
        os.umask(previous)
    assert new.read_bytes() == b"data" and old.read_bytes() == b"y"
    assert mode(new) == expected and mode(old) == expected


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temp(tmp_path, error):
    path = tmp_path / "report.csv"
    path.write_bytes(b"old contents")

    def write(f):
        f.write(b"half of the new")
        raise error("disk gone")

    with pytest.raises(error, match="disk gone"):
        atomic_write(path, write)
    assert path.read_bytes() == b"old contents"
    assert sorted(tmp_path.iterdir()) == [path]


def test_remove_stale_temps_removes_only_temp_leftovers(tmp_path):
    fd, made = hio._create_temp(tmp_path / "best.pt")  # what a write killed before its rename leaves
    os.close(fd)
    stale = [Path(made), tmp_path / ".metrics.csv.AbC_1234.tmp", tmp_path / ".a.b.png.zzzzzzzz.tmp"]
    kept = [tmp_path / "best.pt", tmp_path / "metrics.csv", tmp_path / ".hidden",
            tmp_path / ".short.abc.tmp", tmp_path / "nodot.abcd1234.tmp", tmp_path / ".x.abcd1234.tmp.bak",
            tmp_path / ".x.abcd-234.tmp"]
    for p in stale + kept:
        p.write_bytes(b"")
    (tmp_path / ".folder.abcd1234.tmp").mkdir()  # not a file: left alone
    kept.append(tmp_path / ".folder.abcd1234.tmp")
    assert sorted(remove_stale_temps(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_temps(tmp_path) == []
    assert remove_stale_temps(tmp_path / "missing") == []


def test_atomic_write_never_follows_or_reuses_an_existing_temp_name(tmp_path, monkeypatch):
    """The temp name is new (O_EXCL): a file already there under the first name tried is not touched."""
    names = iter(["aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(hio.secrets, "token_hex", lambda n: next(names))
    taken = tmp_path / ".out.bin.aaaaaaaa.tmp"
    taken.write_bytes(b"someone else's")
    atomic_write_bytes(tmp_path / "out.bin", b"new")
    assert taken.read_bytes() == b"someone else's" and (tmp_path / "out.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.bin.aaaaaaaa.tmp", "out.bin"]
