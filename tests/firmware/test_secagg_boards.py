"""Masked rounds with QEMU boards doing their own secure aggregation (device_agent/board_secagg.py over the UART
family 0x30-0x3F) next to host devices, on the in-memory link: the committed model is exactly the plain FedAvg of
the same devices' deltas with every device alive, with 2 of 6 (33%) dropped after sharing keys (their masks
recovered), and a round with 5 of 6 gone aborts with the model unchanged. The boards' deltas never cross the UART
(no GET_DELTA in a masked round) and never leave a device in clear.

Randomness: the devices' training, the datasets and the fleet are seeded (bit-exact sums); the keys, Shamir
polynomials and self masks are not (host devices: ``secrets``; boards: their DRBG), and need not be: the sum is
exact whatever they are."""

from __future__ import annotations

import copy
from contextlib import ExitStack
from dataclasses import replace

import pytest

from device_agent.board import QemuBoard
from device_agent.board_secagg import BoardDeviceProtocol, SealingBoardTrainer, board_masked_round
from device_agent.bridge import connect
from fleet.compiler.planner import plan_arena
from fleet.security.secagg_config import SecureAggregationConfig
from tests.pure import test_fleet_inmemory as tfi
from tests.pure.test_secagg_rounds import SecureFleet

N = 6
BOARDS = {"d00": "mps2-an386", "d03": "mps2-an500"}


@pytest.fixture(scope="module")
def compiled(monkeypatch_module):
    """The fleet (coordinator, host devices, boards) runs the compiled plan: the board's session label is bound
    to the plan it holds."""
    plan = copy.deepcopy(tfi.PLAN)
    plan_arena(plan)
    monkeypatch_module.setattr(tfi, "PLAN", plan)
    return plan


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _cfg(secure: bool):
    sa = SecureAggregationConfig(stage_timeout=5.0) if secure else None
    return replace(tfi.config(goal=N, secure_aggregation=sa), batch_size=1, local_steps=4)


def _plain(kill=()) -> bytes:
    f = tfi.Fleet(n=N, cfg=_cfg(False))
    f.boot()
    f.round(kill=kill)
    assert f.closed()[-1].committed
    return tfi.state_bytes(f.coord.state)


class Boards:
    """QEMU boards replacing some devices of a fleet: their protocol seals, their masked round runs on the board."""

    def __init__(self, stack: ExitStack, elfs, plan):
        self.clients = {}
        for did, machine in BOARDS.items():
            board = stack.enter_context(QemuBoard(machine, elf=elfs[machine]))
            self.clients[did] = stack.enter_context(connect(f"tcp://{board.endpoint[0]}:{board.endpoint[1]}"))
        self.plan = plan

    def install(self, fleet) -> None:
        for did, client in self.clients.items():
            old = fleet.devices[did]
            trainer = SealingBoardTrainer(client, self.plan)
            fleet.devices[did] = BoardDeviceProtocol(old.id, old.plan, trainer, old.codec, old.buffer, seed=old.seed,
                                                     masked_round=board_masked_round(client))


def _secure_fleet(boards: Boards, drop_after=None) -> SecureFleet:
    f = SecureFleet(n=N, cfg=_cfg(True), drop_after=drop_after)
    boards.install(f)
    return f


@pytest.fixture(scope="module")
def boards(board_elfs, compiled):
    with ExitStack() as stack:
        yield Boards(stack, board_elfs, compiled)


def test_boards_and_hosts_mask_a_round_whose_sum_is_the_plain_one(boards):
    f = _secure_fleet(boards)
    f.boot()
    f.round()
    (closed,) = f.closed()
    assert closed.committed and closed.accepted == tuple(f"d{i:02d}" for i in range(N)), closed
    assert tfi.state_bytes(f.coord.state) == _plain()
    assert {k for _, k, _ in f.sent} == {"secagg"} and f.store.deltas(1) == []
    kinds = [type(m).__name__ for d, _, m in f.sent if d == "d00"]
    assert kinds == ["AdvertiseKeys", "ShareKeys", "MaskedInput", "UnmaskResponse"], kinds
    size = sum(t.numel for t in tfi.PLAN.trainable if not t.personal)
    assert all(f.devices[d].trainer.sealed_length == size + 1 for d in BOARDS)
    for client in boards.clients.values():  # the painted stack after training and a masked round
        info = client.board_info()
        assert info["stack_high_water"] < info["stack_size"] - 1024, info


def test_a_third_dropped_after_sharing_keys_is_recovered(boards):
    drop = {"d00": "ShareKeys", "d04": "ShareKeys"}  # a board and a host device: 2 of 6
    f = _secure_fleet(boards, drop_after=drop)
    f.boot()
    f.round()
    (closed,) = f.closed()
    assert closed.committed and closed.accepted == ("d01", "d02", "d03", "d05"), closed
    assert tfi.state_bytes(f.coord.state) == _plain(kill=tuple(drop))


def test_eighty_percent_gone_aborts_with_the_model_unchanged(boards):
    drop = {d: "AdvertiseKeys" for d in ("d00", "d01", "d02", "d04", "d05")}  # 5 of 6 (83%)
    f = _secure_fleet(boards, drop_after=drop)
    f.boot()
    before = tfi.state_bytes(f.coord.state)
    f.round()
    (closed,) = f.closed()
    assert not closed.committed and "threshold" in closed.detail, closed
    assert tfi.state_bytes(f.coord.state) == before and f.coord.version == 1


def test_board_with_host_peers_at_the_protocol_level_and_its_refusals(boards):
    """One board and two host SecAggDevices under a bare SecAggServer: the unmasked sum is the board's own delta
    (read here with GET_DELTA, which a masked round never does) times its weight plus the hosts' inputs; the board
    refuses a roster asking for DP noise, a forged share, and a second, different unmask request."""
    import numpy as np

    from device_agent.board_secagg import BoardMaskedRound, seal
    from device_agent.secagg import SecAggDevice
    from device_agent.wire.plan import plan_hash
    from device_agent.wire.secagg import (
        Noise,
        Roster,
        SecAggError,
        SharesFor,
        UnmaskRequest,
        encode_dense_input,
        flat_delta,
        session_label,
    )
    from fleet.security.secagg import SecAggServer
    from tests.pure.test_fleet_inmemory import tiny_dataset

    plan, client = boards.plan, boards.clients["d00"]
    shared = [t for t in plan.trainable if not t.personal]
    trainer = SealingBoardTrainer(client, plan)
    base = {t.id: np.asarray(t.data).reshape(t.shape) for t in shared}
    trainer.load_trainable(base)
    x, y = tiny_dataset(3, seed=5)
    for i in range(3):
        trainer.train_step(x[i:i + 1], y[i:i + 1], 0.2)
    delta = flat_delta(shared, base, trainer.trainable_state())
    assert delta.any()
    session, length, weight = session_label(plan_hash(plan)), delta.size + 1, 7

    def begin():
        assert seal(client) == length
        return BoardMaskedRound(client, "d00", 9, session, np.zeros(delta.size, np.int64), weight)

    board = begin()
    hosts = [SecAggDevice(d) for d in ("d01", "d02")]
    keys = (board.advert, *(h.advertise() for h in hosts))
    noisy = Roster(9, session, 2, length, 32, keys, Noise(1.0, 64, 10.0))
    try:
        board.answer(noisy)
        raise AssertionError("the board took a roster asking for DP noise")
    except SecAggError as e:
        assert "no distributed DP noise" in str(e)

    board = begin()  # a new round: the board starts over from SEAL
    hosts = [SecAggDevice(d) for d in ("d01", "d02")]
    keys = (board.advert, *(h.advertise() for h in hosts))
    roster = Roster(9, session, 2, length, 32, keys)
    server = SecAggServer(9, session, 2, length)
    for k in keys:
        server.receive(k)
    assert server.roster() == roster
    server.receive(board.answer(roster))
    for h in hosts:
        server.receive(h.share_keys(roster))
    routed = server.route_shares()
    forged = routed["d00"].shares[0]
    bad = SharesFor("d00", routed["d00"].shared,
                    (type(forged)(forged.sender, forged.receiver, bytes([forged.ciphertext[0] ^ 1])
                                  + forged.ciphertext[1:]),) + routed["d00"].shares[1:])
    rng = np.random.default_rng(0)
    xs = {h.id: rng.integers(-50, 50, delta.size) for h in hosts}
    try:
        BoardMaskedRound._mask(board, bad)
        raise AssertionError("the board opened a forged share")
    except SecAggError as e:
        assert "does not authenticate" in str(e)
    # the forged share was refused, nothing was stored: the genuine ones go through
    server.receive(board.answer(routed["d00"]))
    for h in hosts:
        server.receive(h.masked_input(routed[h.id], encode_dense_input(xs[h.id], 1, 3)))
    request = server.unmask_request()
    server.receive(board.answer(request))
    for h in hosts:
        server.receive(h.unmask(request))
    total = server.result()
    want = encode_dense_input(delta, weight, 3) + sum(encode_dense_input(xs[h], 1, 3) for h in xs)
    assert np.array_equal(total, want.astype(np.uint32))
    try:
        BoardMaskedRound._unmask(board, UnmaskRequest(("d00", "d01"), ("d02",)))
        raise AssertionError("the board answered a second, different unmask request")
    except SecAggError as e:
        assert "second, different unmask request" in str(e)
