"""Shakespeare loader: roles parsed from the plays, users/proxies disjoint, train/test split by position."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.scenarios import text as T
from tests.conftest import require

PLAY = """THE TRAGEDY OF X

PERSONS REPRESENTED.

A Priest.
Players.

ACT I.

Scene I. A room.

[Enter Bernardo and Francisco.]

Ber.
Who's there? [Aside.] Stand,
and unfold yourself.

FRANCISCO
Long live the king!
[Exit.]

Ber.
He.

ACT II.
"""


def test_parse_play_roles_speeches_and_stage_directions():
    speeches = T.parse_play(PLAY)

    assert speeches == [("BER", "Who's there? Stand, and unfold yourself."), ("FRANCISCO", "Long live the king!"),
                        ("BER", "He.")]
    assert T.parse_play("A poem\n\nno acts here\n") == []


def test_windows_never_cross_the_train_test_cut():
    text = "a" * 700 + "b" * 300  # the cut is at 70% of the characters

    s = T.split_role(text, window=20, stride=3)

    a, b = T.encode("a")[0], T.encode("b")[0]
    assert (s.x_train == a).all() and (s.y_train == a).all()  # windows and labels before the cut
    assert (s.x_test == b).all() and (s.y_test == b).all()
    assert len(s.y_train) == (700 - 20 - 1) // 3 + 1 and len(s.y_test) == (300 - 20 - 1) // 3 + 1
    assert s.x_train.shape[1:] == (20,) and s.x_train.dtype == np.int8


def test_encode_maps_unknown_characters_to_other():
    ids = T.encode("Hi {x}")
    assert ids.tolist() == [T.VOCAB.index("H"), T.VOCAB.index("i"), 0, T.OTHER, T.VOCAB.index("x"), T.OTHER]
    assert T.VOCAB_SIZE == len(T.VOCAB) + 1 == 79


def test_missing_data_names_make_setup(tmp_path):
    with pytest.raises(T.DataMissingError, match="make setup"):
        T.load_roles(tmp_path)


@pytest.fixture(scope="module")
def roles():
    require((T.DATA_DIR / T.SDIST).is_file(),
            f"{T.DATA_DIR / T.SDIST} missing (run `make setup`)")
    return T.load_roles()


def test_plays_split_into_roles_with_users_and_proxies_disjoint(roles):
    plays = {p for p, _ in roles}
    assert len(plays) == 37 and ("hamlet", "HAM") in roles and ("tempest", "PROSPERO") in roles
    assert len(roles[("hamlet", "HAM")]) > 50_000

    users, proxies = T.pick_roles(roles, 10, 5, 4000, seed=0)

    assert len(users) == 10 and len(proxies) == 5 and not set(users) & set(proxies)
    assert all(len(roles[k]) >= 4000 for k in users + proxies)
    with pytest.raises(ValueError, match="lower devices"):
        T.pick_roles(roles, 1000, 5, 4000)


def test_scenario_devices_shapes_and_label_balance(roles, monkeypatch):
    monkeypatch.setattr(T, "load_roles", lambda data_dir=None: roles)

    sc = T.load_shakespeare_scenario(6, window=40, stride=8, devices_per_user=2, proxy_users=3, max_proxy=500)

    assert [d.device_id for d in sc.devices] == [f"dev{i:04d}" for i in range(6)]
    assert [d.subject for d in sc.devices] == [0, 0, 1, 1, 2, 2]  # two devices per (play, role)
    assert sc.input_shape == (40,) and sc.num_classes == 79 and sc.x_proxy.shape == (500, 40)
    for a, b in zip(sc.devices[::2], sc.devices[1::2]):  # the two devices of a role hold different windows
        assert not {r.tobytes() for r in a.x_test} & {r.tobytes() for r in b.x_test}
    y = np.concatenate([d.y_train for d in sc.devices])
    for d in sc.devices:
        assert d.x_train.dtype == np.int8 and d.x_train.shape == (len(d.y_train), 40) and len(d.y_test) > 10
        assert d.x_train.max() < 79 and d.y_train.max() < 79
    counts = np.bincount(y, minlength=79) / len(y)
    assert counts.argmax() == T.VOCAB.index(" ") and 0.1 < counts.max() < 0.3  # space is the commonest label
    assert (counts > 0).sum() > 30
