"""The simulator's one error type: a run that cannot start or go on, with what to do about it."""


class SimulationError(RuntimeError):
    """A simulation that cannot start or continue; the message says why and what to do."""
