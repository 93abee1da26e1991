"""UART frame payloads of the secagg command family (codes in ``frames.SECAGG_COMMANDS``; C twin:
firmware/src/proto/tf_proto_secagg.c). :mod:`device_agent.wire.frames` merges :data:`PAYLOADS` into its table.
"""

from __future__ import annotations

import struct

# (direction, code) -> (fixed fields struct, field names, variable tail allowed), as frames.PAYLOADS
PAYLOADS: dict[tuple[str, int], tuple[struct.Struct, tuple[str, ...], bool]] = {}
