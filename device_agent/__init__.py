"""TinyFleet device side: reference int8 engine, wire formats, protocol state machine, MQTT/serial adapters."""
