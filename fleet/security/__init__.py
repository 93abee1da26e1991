"""Trust machinery: broker config (users, ACL, TLS), differential privacy, secure aggregation (server side).

Each module is independent; none of them is imported by the coordinator's hot path unless configured. The device
side of secure aggregation lives in ``device_agent/secagg.py`` (a device never imports ``fleet``). Threat model:
``docs/security.md``.
"""
