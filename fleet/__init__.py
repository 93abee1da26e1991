"""TinyFleet coordinator side: compiler, round state machine, aggregation, store, simulation, CLI."""
