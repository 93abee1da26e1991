"""The ready-made ServerApp's run config: every error named with its key, stock strategies by name with their
arguments, and the strategies our devices cannot honour refused."""

from __future__ import annotations

import pytest
from flwr.serverapp.strategy import FedAdam, FedMedian, FedProx, FedTrimmedAvg, Krum

from fleet.flower.runconfig import RunConfigError, make_strategy, parse

BASE = {"plan": "/p.ttp", "key": "/k.pem"}


def test_defaults_and_overrides():
    rc = parse({**BASE, "lr": 0.1, "num-rounds": 5, "topk-permille": 100, "eval-data": "", "final-model": "/m.npz"})
    assert (rc.lr, rc.num_rounds, rc.topk_permille, rc.eval_data, rc.final_model) == (0.1, 5, 100, None, "/m.npz")
    assert (rc.strategy, rc.fleet, rc.min_nodes) == ("FedAvg", "tinyfleet", 2)


def test_every_bad_key_is_named_in_one_error():
    with pytest.raises(RunConfigError) as e:
        parse({"plan": "/p.ttp", "lr": -1.0, "local-steps": 2.5, "num-roundz": 3, "broker": "tcp://x",
               "strategy": "FedBest"})
    msg = str(e.value)
    for part in ("lr: must be > 0, got -1.0", "local-steps: expected int", "num-roundz: unknown key",
                 "broker: must be mqtt://", "strategy: expected one of", "key: required"):
        assert part in msg, msg


@pytest.mark.parametrize(("name", "args", "cls", "attr", "value"), [
    ("fedmedian", {}, FedMedian, "min_train_nodes", 4),
    ("FedTrimmedAvg", {"strategy-args.beta": 0.1}, FedTrimmedAvg, "beta", 0.1),
    ("Krum", {"strategy-args.num-malicious-nodes": 1}, Krum, "num_malicious_nodes", 1),
    ("FedAdam", {"strategy-args.eta": 2.0}, FedAdam, "eta", 2.0),
    ("FedProx", {}, FedProx, "proximal_mu", 0.0),
])
def test_stock_strategies_by_name_with_their_arguments(name, args, cls, attr, value):
    s = make_strategy(parse({**BASE, "strategy": name, "min-nodes": 4, **args}))
    assert type(s) is cls and getattr(s, attr) == value
    assert s.fraction_evaluate == 0.0 and s.min_available_nodes == 4


@pytest.mark.parametrize(("args", "why"), [
    ({"strategy": "FedProx", "strategy-args.proximal-mu": 0.1}, "proximal term"),
    ({"strategy-args.fraction-evaluate": 0.5}, "devices only train"),
    ({"strategy-args.betta": 0.1}, "takes no such argument"),
    ({"insecure-unsigned": True}, "choose one"),
])
def test_what_devices_cannot_do_is_refused(args, why):
    with pytest.raises(RunConfigError, match=why):
        parse({**BASE, **args})


def test_unsigned_only_when_asked():
    rc = parse({"plan": "/p.ttp", "insecure-unsigned": True})
    assert rc.key is None and rc.insecure_unsigned
