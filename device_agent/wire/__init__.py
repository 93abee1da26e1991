"""Every TinyFleet binary format, defined once: plan blob, model update, delta, UART frames (docs/formats.md).

Imports only ``device_agent.engine`` (plus numpy, stdlib, cryptography). Each format has one writer and one
reader; every reader refuses bad input with :class:`WireFormatError` carrying a :class:`WireError` code that the
C firmware returns for the same bytes. Delta and model update are at version 2 (``wire.sparse`` tensor records);
their readers also accept version 1.
"""

from device_agent.wire.delta import (
                                     DELTA,
                                     Delta,
                                     DeltaSize,
                                     Encoding,
                                     TensorDelta,
                                     delta_from_bytes,
                                     delta_from_records,
                                     delta_support,
                                     delta_to_dense,
                                     encode_delta,
                                     encode_tensor,
                                     residual_after,
                                     topk_indices,
)
from device_agent.wire.envelope import SigAlg, Signer, Verifier, content_hash
from device_agent.wire.errors import WireError, WireFormatError
from device_agent.wire.plan import PLAN, plan_from_bytes, plan_hash, plan_to_bytes
from device_agent.wire.sparse import Enc, Record, narrowest_dtype
from device_agent.wire.update import (
                                     UPDATE,
                                     Form,
                                     ModelUpdate,
                                     apply_update,
                                     model_hash,
                                     trainable_state,
                                     update_from_state,
                                     update_from_states,
                                     update_hash,
)

__all__ = [
    "DELTA", "PLAN", "UPDATE", "Delta", "DeltaSize", "Enc", "Encoding", "Form", "ModelUpdate", "Record", "SigAlg",
    "Signer", "TensorDelta", "Verifier", "WireError", "WireFormatError", "apply_update", "content_hash",
    "delta_from_bytes", "delta_from_records", "delta_support", "delta_to_dense", "encode_delta", "encode_tensor",
    "model_hash", "narrowest_dtype", "plan_from_bytes", "plan_hash", "plan_to_bytes", "residual_after",
    "topk_indices", "trainable_state", "update_from_state", "update_from_states", "update_hash",
]
