"""The native engine refuses a library built from other sources than its tree's (a stale build), naming the fix,
and computes the same build id as the make rule that builds the library."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from unittest import mock

import pytest

from device_agent import native
from tests.conftest import ROOT, require_cmd


def _fake_library(build_id: bytes | None) -> mock.MagicMock:
    """What ctypes.CDLL returns for a library exporting ``build_id`` (None: built before libraries had one)."""
    lib = mock.MagicMock()
    if build_id is None:
        del lib.tf_native_build_id  # NOTE: ctypes raises AttributeError for a symbol the library does not export
    else:
        lib.tf_native_build_id.return_value = build_id
    return lib


@pytest.mark.parametrize("exported", [b"0123456789abcdef", None])
def test_a_library_with_another_or_no_build_id_is_refused_naming_make_native(tmp_path, monkeypatch, exported):
    # Prepare: a library file whose exported id is not the one of this source tree
    path = tmp_path / "libtinyfleet_native.so"
    path.write_bytes(b"")
    monkeypatch.setattr(native.ctypes, "CDLL", lambda _: _fake_library(exported))
    # Execute
    with pytest.raises(native.NativeError) as e:
        native.load_library(path)
    # Assert
    msg = str(e.value)
    assert f"{path} is stale" in msg and "run `make native` to rebuild it" in msg
    assert f"build id {(exported or b'none').decode()}" in msg and native.source_build_id(native.FIRMWARE) in msg


def test_a_library_with_the_trees_build_id_loads(tmp_path, monkeypatch):
    # Prepare
    path = tmp_path / "libtinyfleet_native.so"
    path.write_bytes(b"")
    want = native.source_build_id(native.FIRMWARE)
    monkeypatch.setattr(native.ctypes, "CDLL", lambda _: _fake_library(want.encode()))
    # Execute
    lib = native.load_library(path)
    # Assert
    assert native.library_build_id(lib) == want


def _copy_sources(dst: Path) -> Path:
    for pattern in (*native.NATIVE_SOURCES, "boards/host/native.mk"):
        for p in native.FIRMWARE.glob(pattern):
            (dst / p.relative_to(native.FIRMWARE)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst / p.relative_to(native.FIRMWARE))
    return dst


def _make_id(firmware: Path) -> str:
    r = subprocess.run(["make", "-s", "-C", str(firmware), "-f", "boards/host/native.mk", "build-id"],
                       check=True, capture_output=True, text=True)
    return r.stdout.strip()


def test_python_and_native_mk_compute_the_same_id_and_any_source_change_moves_it(tmp_path):
    require_cmd("make", "sha256sum")
    # Prepare: a throwaway copy of the sources
    copy = _copy_sources(tmp_path / "firmware")
    before = native.source_build_id(copy)
    # Execute: one byte of a private kernel header changes
    header = next(copy.glob("src/kernels/*.h"))
    header.write_bytes(header.read_bytes() + b"\n")
    after = native.source_build_id(copy)
    # Assert: the make rule and Python agree on both trees; the change moved the id
    assert before == native.source_build_id(ROOT / "firmware") and len(before) == 16
    assert after != before and _make_id(copy) == after
    header.write_bytes(header.read_bytes()[:-1])
    assert _make_id(copy) == before


def test_outside_a_source_tree_there_is_no_id_to_check(tmp_path):
    # Assert: an installed package without firmware sources loads whatever library it is given
    assert native.source_build_id(tmp_path) is None
