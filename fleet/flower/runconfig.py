"""The run config of the ready-made ServerApp (``fleet.flower_app:app``), validated once, and the stock Flower
strategy it names (pure: no I/O; files are only named here, read by the app).

Every error is collected with its key (``lr: must be > 0, got -1``) and raised together as one
:class:`RunConfigError`; an unknown key is an error too (a typo would otherwise silently take a default).
It refuses strategies our devices cannot honour: ``FedProx`` with ``proximal-mu`` > 0 (devices do not add the
proximal term to their int8 update, so it would silently be FedAvg) and client-side evaluation
(``fraction-evaluate`` > 0: devices only train; ``eval-data`` evaluates on the coordinator instead).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

STRATEGY_ARGS = "strategy-args"  # [tool.flwr.app.config.strategy-args] -> run config keys "strategy-args.<name>"
# NOTE: not by name from flwr: these need another strategy or a non-array model (XGBoost), or are DP wrappers
# whose clipping needs arguments a run config cannot express; use them from Python around SparseDeltaStrategy
_NOT_BY_NAME = {"strategy", "result", "differentialprivacyclientsidefixedclipping",
                "differentialprivacyserversidefixedclipping", "differentialprivacyclientsideadaptiveclipping",
                "differentialprivacyserversideadaptiveclipping", "fedxgbbagging", "fedxgbcyclic"}


class RunConfigError(ValueError):
    """The run config does not make a run; the message lists every problem with its key."""


@dataclass
class RunConfig:
    plan: str
    key: str | None  # the fleet's Ed25519 private key (PEM); None only with insecure-unsigned
    broker: str = "mqtt://127.0.0.1:1883"
    fleet: str = "tinyfleet"
    strategy: str = "FedAvg"
    strategy_args: dict[str, Any] = field(default_factory=dict)  # Flower's keyword names (snake_case)
    num_rounds: int = 3
    min_nodes: int = 2
    lr: float = 0.05
    local_steps: int = 10
    batch_size: int = 1
    topk_permille: int = 0
    round_timeout: float = 60.0
    first_round: int = 1
    initial_model: str = "fleet"  # fleet: continue from the model the devices hold | plan: the plan's values
    eval_data: str | None = None
    final_model: str | None = None
    insecure_unsigned: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


# key -> (attribute, type, check or None, what the check wants)
_KEYS: dict[str, tuple[str, type, Any, str]] = {
    "plan": ("plan", str, bool, "a path to a .ttp plan"),
    "key": ("key", str, bool, "a path to the fleet's Ed25519 private key (PEM)"),
    "broker": ("broker", str, lambda v: v.startswith(("mqtt://", "mqtts://")), "mqtt://host:port or mqtts://..."),
    "fleet": ("fleet", str, lambda v: v.replace("-", "").replace("_", "").replace(".", "").isalnum() and len(v) <= 64,
              "1-64 letters, digits, '.', '_' or '-'"),
    "strategy": ("strategy", str, bool, "a Flower strategy name"),
    "num-rounds": ("num_rounds", int, lambda v: v >= 1, ">= 1"),
    "min-nodes": ("min_nodes", int, lambda v: v >= 1, ">= 1"),
    "lr": ("lr", float, lambda v: 0 < v <= 1e6, "> 0"),
    "local-steps": ("local_steps", int, lambda v: 1 <= v <= 1_000_000, "in 1..1000000"),
    "batch-size": ("batch_size", int, lambda v: 1 <= v <= 4096, "in 1..4096"),
    "topk-permille": ("topk_permille", int, lambda v: 0 <= v <= 1000, "in 0..1000 (0: every coordinate)"),
    "round-timeout": ("round_timeout", float, lambda v: v > 0, "> 0 seconds"),
    "first-round": ("first_round", int, lambda v: 1 <= v < 2**32, "in 1..2**32-1"),
    "initial-model": ("initial_model", str, lambda v: v in ("fleet", "plan"), "'fleet' or 'plan'"),
    "eval-data": ("eval_data", str, bool, "a path to an .npz with x and y"),
    "final-model": ("final_model", str, bool, "a path for the final model (.npz)"),
    "insecure-unsigned": ("insecure_unsigned", bool, None, "true or false"),
    "ca-file": ("ca_file", str, bool, "a path"),
    "cert-file": ("cert_file", str, bool, "a path"),
    "key-file": ("key_file", str, bool, "a path"),
}


_OPTIONAL_PATHS = {"key", "eval-data", "final-model", "ca-file", "cert-file", "key-file"}


def parse(run_config: dict[str, Any]) -> RunConfig:
    """``context.run_config`` -> :class:`RunConfig`, or :class:`RunConfigError` naming every bad key."""
    errors: list[str] = []
    values: dict[str, Any] = {}
    args: dict[str, Any] = {}
    for k, v in run_config.items():
        if k.startswith(STRATEGY_ARGS + "."):
            args[k[len(STRATEGY_ARGS) + 1:].replace("-", "_")] = v
            continue
        if k not in _KEYS:
            errors.append(f"{k}: unknown key (known: {', '.join(sorted(_KEYS))}, {STRATEGY_ARGS}.<name>)")
            continue
        attr, kind, check, want = _KEYS[k]
        if v == "" and k in _OPTIONAL_PATHS:
            continue  # NOTE: flwr overrides only keys the app's pyproject lists, so "" there means "not set"
        ok_type = (isinstance(v, bool) if kind is bool else
                   isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or v == int(v))
                   if kind in (int, float) else isinstance(v, str))
        if not ok_type:
            errors.append(f"{k}: expected {kind.__name__} ({want}), got {v!r}")
            continue
        v = kind(v)
        if check is not None and not check(v):
            errors.append(f"{k}: must be {want}, got {v!r}")
            continue
        values[attr] = v
    if "plan" not in values and not any(e.startswith("plan:") for e in errors):
        errors.append("plan: required (the .ttp from `tinyfleet compile` that the devices run)")
    if "key" not in values and not values.get("insecure_unsigned", False):
        errors.append("key: required: the fleet's Ed25519 private key (PEM; created with its .pub beside it if "
                      "missing) that signs plans and models; `insecure-unsigned = true` only for tests")
    if "key" in values and values.get("insecure_unsigned", False):
        errors.append("insecure-unsigned: true together with key: choose one")
    rc = RunConfig(**{"key": None, "plan": "", **values}, strategy_args=args)
    try:
        strategy_class(rc.strategy)
    except RunConfigError as e:
        errors.append(str(e))
    else:
        errors += _check_args(rc)
    if errors:
        raise RunConfigError("run config: " + "; ".join(errors))
    return rc


def strategy_classes() -> dict[str, type]:
    """Stock Flower strategies usable by name: lower-case name -> class."""
    from flwr.serverapp import strategy as fs

    return {n.lower(): c for n, c in vars(fs).items() if inspect.isclass(c) and issubclass(c, fs.Strategy)
            and not inspect.isabstract(c) and n.lower() not in _NOT_BY_NAME}


def strategy_class(name: str) -> type:
    classes = strategy_classes()
    if name.lower() not in classes:
        raise RunConfigError(f"strategy: expected one of {', '.join(sorted(c.__name__ for c in classes.values()))}, "
                             f"got {name!r}")
    return classes[name.lower()]


def _check_args(rc: RunConfig) -> list[str]:
    cls = strategy_class(rc.strategy)
    params = inspect.signature(cls.__init__).parameters
    errors = [f"{STRATEGY_ARGS}.{k.replace('_', '-')}: {cls.__name__} takes no such argument (it takes "
              f"{', '.join(p.replace('_', '-') for p in params if p != 'self')})"
              for k in rc.strategy_args if k not in params]
    if rc.strategy_args.get("fraction_evaluate", 0.0) != 0.0:
        errors.append(f"{STRATEGY_ARGS}.fraction-evaluate: TinyFleet devices only train; evaluate on the "
                      "coordinator with eval-data instead (fraction-evaluate must be 0)")
    if rc.strategy_args.get("proximal_mu", 0.0) != 0.0:
        errors.append(f"{STRATEGY_ARGS}.proximal-mu: TinyFleet devices do not add FedProx's proximal term to their "
                      "int8 update, so FedProx would silently be FedAvg: use FedAvg (or proximal-mu = 0)")
    return errors


def make_strategy(rc: RunConfig):
    """The named stock strategy with the run config's arguments; ``min-nodes`` sets ``min_train_nodes`` and
    ``min_available_nodes`` unless given, and client-side evaluation is off."""
    cls = strategy_class(rc.strategy)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in (("fraction_evaluate", 0.0), ("min_train_nodes", rc.min_nodes),
                                ("min_available_nodes", rc.min_nodes))
              if k in params}
    kwargs.update(rc.strategy_args)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise RunConfigError(f"run config: {STRATEGY_ARGS}: {cls.__name__} refused them: {e}") from None
