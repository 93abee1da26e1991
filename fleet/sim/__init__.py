"""Fleet simulation: brokers, device backends, scenarios, reports."""
