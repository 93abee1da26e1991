"""The ``secure_aggregation:`` section of a fleet config: data and checks only, no protocol.

The protocol itself lives in :mod:`fleet.security.secagg` (coordinator), :mod:`fleet.coordinator.secagg_round`
(its stages inside a sync round) and :mod:`device_agent.secagg` (device); this dataclass only says whether a
fleet's rounds use it and with which parameters. It refuses distributed DP noise (not built yet), central DP and
async rounds together with masking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class SecureAggregationConfig:
    """Secure aggregation (Bonawitz et al. double masking) for every round of a fleet.

    ``threshold`` is the fraction of a round's selected devices that must survive to the unmasking stage (and the
    Shamir threshold; always above half of them); fewer and the round aborts with the model unchanged. ``bits``
    is the modulus of the masked sums (2^bits: 32, or 64 for large sample counts). ``stage_timeout`` is how long
    each stage after the key advertisement waits for the devices (seconds). ``noise_multiplier`` is reserved for
    distributed DP noise (each device adds its share): it must be 0 until that is built.
    """

    threshold: float = 0.6
    bits: int = 32
    stage_timeout: float = 30.0
    noise_multiplier: float = 0.0

    def validate(self) -> list[str]:
        errs = []
        if not (isinstance(self.threshold, (int, float)) and 0.5 <= self.threshold <= 1):
            errs.append(f"threshold: must be a fraction in [0.5, 1] (an honest majority), got {self.threshold!r}")
        if isinstance(self.bits, bool) or self.bits not in (32, 64):
            errs.append(f"bits: expected 32 or 64, got {self.bits!r}")
        if not (isinstance(self.stage_timeout, (int, float)) and math.isfinite(self.stage_timeout)
                and self.stage_timeout > 0):
            errs.append(f"stage_timeout: must be finite and > 0 seconds, got {self.stage_timeout!r}")
        if not (isinstance(self.noise_multiplier, (int, float)) and math.isfinite(self.noise_multiplier)
                and self.noise_multiplier >= 0):
            errs.append(f"noise_multiplier: must be finite and >= 0, got {self.noise_multiplier!r}")
        elif self.noise_multiplier:
            errs.append("noise_multiplier: distributed DP noise with secure aggregation is not built yet; "
                        "set 0 (the sum is then exact and carries no noise)")
        return errs

    def combination_errors(self, dp: bool, mode: str) -> list[str]:
        """What the rest of the fleet config must not ask together with masking (key paths included)."""
        errs = []
        if dp:
            errs.append("secure_aggregation: central DP (dp:) clips and noises individual deltas the coordinator "
                        "no longer sees; remove dp: (distributed DP noise under masking is not built yet)")
        if mode != "sync":
            errs.append(f"secure_aggregation: masked rounds are sync rounds; set mode: sync, got {mode!r}")
        return errs
