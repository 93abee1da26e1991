"""`tinyfleet quantize-data` refuses a file that is not a .npz with a message naming what it is and what to write,
never numpy's guess that it holds pickled data."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.cli import main


@pytest.mark.parametrize("content, what", [
    (b"x,y\n0.5,1\n", "starts with b'x,y\\n'"),  # a CSV
    (b"", "an empty file"),
    (None, "a single-array .npy file"),  # np.save of x alone
])
def test_a_file_that_is_not_an_npz_archive_is_named_as_such(tmp_path, capsys, content, what):
    # Prepare
    path = tmp_path / "samples.npz"
    if content is None:
        with path.open("wb") as f:
            np.save(f, np.zeros((2, 3), np.float32))
    else:
        path.write_bytes(content)
    # Execute
    rc = main(["quantize-data", str(path), "-o", str(tmp_path / "q.npz"), "--scale", "0.1", "--zero-point", "0"])
    err = capsys.readouterr().err
    # Assert
    assert rc == 2 and f"{path}: not a .npz (zip) archive" in err and what in err
    assert "np.savez(path, x=x, y=y)" in err and "pickle" not in err
    assert not (tmp_path / "q.npz").exists()


def test_an_npz_archive_still_quantizes(tmp_path, capsys):
    # Prepare
    np.savez(tmp_path / "d.npz", x=np.array([[0.0, 0.3, -1.0, 20.0]], np.float32), y=np.array([3]))
    # Execute
    rc = main(["quantize-data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "q.npz"), "--scale", "0.1",
               "--zero-point", "1"])
    # Assert: round(x / 0.1) + 1, 20.0 saturated at 127; y copied
    out = np.load(tmp_path / "q.npz")
    assert rc == 0 and out["x"].tolist() == [[1, 4, -9, 127]] and out["y"].tolist() == [3]
    assert "1 of 4 values saturated" in capsys.readouterr().out
