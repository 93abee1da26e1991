"""The ``secure_aggregation:`` section of a fleet config: data and checks only, no protocol.

The protocol itself lives in :mod:`fleet.security.secagg` (coordinator), :mod:`fleet.coordinator.secagg_round`
(its stages inside a sync round) and :mod:`device_agent.secagg` (device); this dataclass only says whether a
fleet's rounds use it and with which parameters. With a ``dp:`` section too, the noise is distributed (each
device adds its share of Skellam noise, see docs/security.md); it refuses async rounds together with masking.
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
    each stage after the key advertisement waits for the devices (seconds). ``resolution``: with ``dp:``, the
    number of integer lattice steps a clipped delta's L2 norm (``dp.clip``) is scaled to before rounding and noise
    (finer costs sensitivity sqrt(D)/2 / resolution less, and needs more bits).
    """

    threshold: float = 0.6
    bits: int = 32
    stage_timeout: float = 30.0
    resolution: int = 4096

    def validate(self) -> list[str]:
        errs = []
        if not (isinstance(self.threshold, (int, float)) and 0.5 <= self.threshold <= 1):
            errs.append(f"threshold: must be a fraction in [0.5, 1] (an honest majority), got {self.threshold!r}")
        if isinstance(self.bits, bool) or self.bits not in (32, 64):
            errs.append(f"bits: expected 32 or 64, got {self.bits!r}")
        if not (isinstance(self.stage_timeout, (int, float)) and math.isfinite(self.stage_timeout)
                and self.stage_timeout > 0):
            errs.append(f"stage_timeout: must be finite and > 0 seconds, got {self.stage_timeout!r}")
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or \
                not 16 <= self.resolution <= 1 << 24:
            errs.append(f"resolution: must be an integer in [16, 2^24], got {self.resolution!r}")
        return errs

    def combination_errors(self, dp: bool, mode: str, noise_multiplier: float = 1.0) -> list[str]:
        """What the rest of the fleet config must not ask together with masking (key paths included)."""
        errs = []
        if dp and not noise_multiplier > 0:
            errs.append("dp.noise_multiplier: must be > 0 with secure_aggregation (the devices' Skellam noise "
                        f"shares need a positive total), got {noise_multiplier}")
        if dp and self.bits == 32 and isinstance(self.resolution, int) and self.resolution > 1 << 16:
            errs.append(f"secure_aggregation.resolution: {self.resolution} lattice steps per device can overflow "
                        "32-bit sums; use bits: 64 or resolution <= 65536")
        if mode != "sync":
            errs.append(f"secure_aggregation: masked rounds are sync rounds; set mode: sync, got {mode!r}")
        return errs
