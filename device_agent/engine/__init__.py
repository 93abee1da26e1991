"""Reference int8 training engine (numpy only): the spec the C firmware matches bit for bit."""

from .forward import forward_activations, run_forward
from .trainer import StepStats, Trainer

__all__ = ["StepStats", "Trainer", "forward_activations", "run_forward"]
