"""The compiler pipeline: from a fleet config and its scenario (or a user's own model) to a signed-ready plan.

``serve`` and ``simulate`` build plans here and nowhere else: pretrain the config's float model on the
coordinator's proxy set, import it with PTQ calibration, pick the sparse scheme (named, a mapping, or searched
under the board's budget), compile, then mark the config's personal tensors. It reads the board YAML and the
proxy data it is given; it never touches a device's data or the network.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from device_agent.engine import ir

if TYPE_CHECKING:
    from fleet.scenarios import Scenario
    from fleet.schema import FleetConfig

ROOT = Path(__file__).resolve().parents[2]
BOARDS = ROOT / "configs" / "boards"
MODELS = ("imu_cnn", "char_cnn", "char_conv", "tabular_net")


class PipelineError(ValueError):
    """A config the pipeline cannot turn into a plan (unknown board or model, scheme over budget...)."""


def plan_for(cfg: FleetConfig, scenario: Scenario) -> ir.Plan:
    """The plan a fleet trains: :func:`build_plan`, then ``cfg.personal`` marked (:func:`mark_personal`).

    Personalization methods (``cfg.personalization``) mark nothing: their personal copy lives beside the
    shared model on the device (device_agent/engine/personal.py)."""
    plan, _, _ = build_plan(cfg, scenario)
    try:
        return mark_personal(plan, cfg.personal)
    except ValueError as e:
        raise PipelineError(str(e)) from None


def make_model(name: str, x: np.ndarray, num_classes: int):
    """A fresh float torch model ``name`` sized for samples like ``x`` (batch first) and ``num_classes``.

    Raises ValueError for an unknown name or a model that cannot read such samples.
    """
    from fleet.compiler import models

    if name == "imu_cnn":
        return models.ImuCNN(in_channels=x.shape[1], num_classes=num_classes)
    if name in ("char_cnn", "char_conv"):
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"model.name: {name} reads character ids (N, L), got {x.dtype} {x.shape}")
        if name == "char_cnn":
            return models.CharCNN(vocab=num_classes)
        return models.CharConvNet(vocab=num_classes, length=x.shape[1])
    if name == "tabular_net":
        return models.TabularNet(in_features=x.shape[1], num_classes=num_classes)
    raise ValueError(f"model.name: unknown model {name!r} (expected one of {', '.join(MODELS)})")


def float_batch(x: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """(N, C, 1, W) windows -> (N, C, W) for a torch Conv1d model; (N, L) character ids -> int64 for nn.Embedding;
    with ``shape`` (an own model's per-sample input shape) -> (N, *shape)."""
    if shape is not None:
        return np.ascontiguousarray(x.reshape(len(x), *shape))
    if x.ndim == 2:
        return x.astype(np.int64)
    return x.reshape(x.shape[0], x.shape[1], x.shape[-1])


def _own_model(cfg: FleetConfig):
    """The config's own torch model (``model.torch``) with its weights, or a PipelineError."""
    from fleet.compiler.models import OwnModelError, build_own_model

    try:
        return build_own_model(cfg.model.torch or "", cfg.model.root, cfg.model.weights)
    except OwnModelError as e:
        raise PipelineError(f"model.torch: {e}") from None


def pretrain(cfg: FleetConfig, x: np.ndarray, y: np.ndarray, num_classes: int):
    """The float model, trained ``pretrain_epochs`` on the coordinator's proxy set (fp32, Adam)."""
    import torch

    torch.manual_seed(cfg.seed)
    if cfg.model.torch is not None:  # NOTE: given weights are the trained model: no pretraining on top
        model = _own_model(cfg)
        epochs = 0 if cfg.model.weights is not None else cfg.model.pretrain_epochs
    else:
        try:
            model = make_model(cfg.model.name, x, num_classes)
        except ValueError as e:
            raise PipelineError(str(e)) from None
        epochs = cfg.model.pretrain_epochs
    if epochs and len(y):
        xt, yt = torch.from_numpy(float_batch(x, torch_input_shape(cfg))), torch.from_numpy(y)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(cfg.seed)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(yt), generator=gen).split(64):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
                opt.step()
    return model.eval()


def torch_input_shape(cfg: FleetConfig) -> tuple[int, ...] | None:
    """An own model's per-sample input shape (``model.input_shape``, else the class's ``input_shape``)."""
    if cfg.model.torch is None:
        return None
    shape = cfg.model.torch_shape()
    if shape is None:  # NOTE: a model may state its own (self.input_shape), as the built-in ones do
        shape = tuple(getattr(_own_model(cfg), "input_shape", ()) or ())
    return shape or None


def build_plan(cfg: FleetConfig, scenario) -> tuple[object, object, str]:
    """Pretrain, quantize (PTQ on proxy windows), pick the scheme, compile under the board's budget."""
    from fleet.compiler.compile import BudgetError, compile_plan

    graph, scheme, budget = _graph_and_scheme(cfg, scenario)
    try:
        plan, report = compile_plan(graph, scheme, budget=budget)
    except BudgetError as e:
        raise PipelineError(f"model.scheme: {e}") from None
    return plan, report, scheme.name


def build_family(cfg: FleetConfig, scenario):
    """The nested plan family of ``cfg.plan_budgets`` (fleet/compiler/family.py), ``cfg.personal`` marked in
    every member: the config's scheme (searched under the largest budget for ``auto``) shrunk where a budget needs.

    Raises PipelineError for a budget below the model's classifier-only plan (naming what it needs)."""
    from fleet.compiler.compile import BudgetError
    from fleet.compiler.family import FamilyError, Member, PlanFamily
    from fleet.compiler.family import build_family as compile_family

    graph, scheme, _ = _graph_and_scheme(cfg, scenario, max(cfg.plan_budgets))
    try:
        fam = compile_family(graph, scheme, list(cfg.plan_budgets))
        return PlanFamily([Member(m.budget, mark_personal(m.plan, cfg.personal), m.report, m.scheme)
                           for m in fam.members])
    except BudgetError as e:
        raise PipelineError(f"plan_budgets: {e}") from None
    except (FamilyError, ValueError) as e:
        raise PipelineError(f"plan_budgets: {e}") from None


def _graph_and_scheme(cfg: FleetConfig, scenario, budget: int | None = None):
    """The imported int8 graph, the config's scheme and the budget it is compiled under (default the board's)."""
    from fleet.compiler.scheme import named_scheme, search_scheme
    from fleet.compiler.torch_import import import_torch
    from fleet.config import BoardConfig, ConfigError, load
    from fleet.scenarios.base import quantize

    try:
        board = load(BoardConfig, BOARDS / f"{cfg.model.board}.yaml")
    except ConfigError as e:
        raise PipelineError(f"model.board: {e}") from None
    budget = board.training_budget if budget is None else budget
    x_proxy, y_proxy = scenario.x_proxy, scenario.y_proxy
    if not len(y_proxy):  # no proxy subjects: calibrate on the first device's windows (still not its test set)
        x_proxy, y_proxy = scenario.devices[0].x_train, scenario.devices[0].y_train
    model = pretrain(cfg, x_proxy, y_proxy, scenario.num_classes)
    rng = np.random.default_rng(cfg.seed)
    calib = x_proxy[rng.permutation(len(x_proxy))[:512]]
    graph = import_torch(model, float_batch(calib, torch_input_shape(cfg)), name=type(model).__name__)
    s = cfg.model.scheme
    if isinstance(s, dict):
        scheme = ir.SparseScheme(name="config", n_bias_update=int(s.get("n_bias_update", 0)),
                                 weight_ratio={int(k): float(v) for k, v in (s.get("weight_ratio") or {}).items()})
    elif s == "auto":
        t = graph.tensors[graph.input_id]
        scale, zp = float(np.ravel(t.scale)[0]), int(t.zero_point)
        order = rng.permutation(len(y_proxy))[:256]
        scheme = search_scheme(graph, budget, quantize(x_proxy[order], scale, zp),
                               y_proxy[order].astype(np.int32), steps=10, seed=cfg.seed).scheme
    else:
        scheme = named_scheme(graph, s)
    return graph, scheme, budget


def mark_personal(plan: ir.Plan, names: Sequence[str]) -> ir.Plan:
    """A copy of ``plan`` whose trainable tensors named in ``names`` are personal (``ir.Tensor.personal``).

    Parameters
    ----------
    plan : the compiled plan (left untouched).
    names : tensor names as the importer gave them, e.g. ``["classifier.bias"]``; empty -> ``plan`` itself.

    Raises
    ------
    ValueError
        A name is not a trainable tensor of the plan, or every trainable tensor would become personal (then
        the fleet would have nothing to aggregate).
    """
    if not names:
        return plan
    trainable = {t.name: t for t in plan.trainable}
    unknown = [n for n in names if n not in trainable]
    if unknown:
        raise ValueError(f"personal: {unknown} are not trainable tensors of plan {plan.name!r} "
                         f"(trainable: {sorted(trainable)})")
    if set(names) >= set(trainable):
        raise ValueError(f"personal: every trainable tensor ({sorted(trainable)}) would be personal: "
                         "leave at least one shared tensor for the fleet to train")
    out = copy.deepcopy(plan)
    for t in out.tensors:
        if t.kind == ir.Kind.TRAINABLE and t.name in names:
            t.personal = True
    return out
