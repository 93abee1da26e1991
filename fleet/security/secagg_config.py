"""The ``secure_aggregation:`` section of a fleet config: data and checks only, no protocol.

The protocol itself lives in :mod:`fleet.security.secagg` (coordinator) and :mod:`device_agent.secagg`
(device); this dataclass only says whether a fleet's rounds use it and with which parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class SecureAggregationConfig:
    """Secure aggregation (SecAgg+ style masking) for every round of a fleet.

    ``threshold`` is the fraction of a round's selected devices that must survive to the unmasking stage (and the
    Shamir threshold); fewer and the round aborts with the model unchanged. ``bits`` is the modulus of the masked
    sums (2^bits). ``noise_multiplier`` > 0 adds distributed DP noise: each device adds its share so that the sum
    carries the target noise (0: no noise).
    """

    threshold: float = 0.6
    bits: int = 32
    noise_multiplier: float = 0.0

    def validate(self) -> list[str]:
        # NOTE: refused until the coordinator and devices run the protocol in MQTT rounds (issue #16): a config
        # that asks for masking must never run unmasked.
        errs = ["not yet available in MQTT rounds (the protocol runs only in memory so far); remove the section"]
        if not (isinstance(self.threshold, (int, float)) and 0.5 <= self.threshold <= 1):
            errs.append(f"threshold: must be a fraction in [0.5, 1] (an honest majority), got {self.threshold!r}")
        if isinstance(self.bits, bool) or self.bits not in (16, 24, 32):
            errs.append(f"bits: expected 16, 24 or 32, got {self.bits!r}")
        if not (isinstance(self.noise_multiplier, (int, float)) and math.isfinite(self.noise_multiplier)
                and self.noise_multiplier >= 0):
            errs.append(f"noise_multiplier: must be finite and >= 0, got {self.noise_multiplier!r}")
        return errs
