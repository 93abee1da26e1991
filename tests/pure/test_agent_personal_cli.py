"""`device-agent run --personalize`: bad personalization flags are one line and exit 2; a good one gets as far as
the broker (the personalizer is built from the plan before connecting)."""

from __future__ import annotations

import pytest

from tests.pure.test_hardening_cli_agent import agent, files, free_port  # noqa: F401  (fixture)


@pytest.mark.parametrize(("extra", "words"), [
    (["--personal-steps", "-1"], "--personal-steps must be >= 0"),
    (["--ditto-lambda", "1.5"], "--ditto-lambda in [0, 1]"),
    (["--personalize", "fedavg"], "invalid choice"),
])
def test_bad_personalization_flags(files, extra, words):  # noqa: F811
    # Prepare
    args = ["--broker", f"mqtt://127.0.0.1:{free_port()}", "--id", "d1", "--insecure-unsigned",
            "--connect-timeout", "1", "--data", str(files / "good.npz"), "--plan", str(files / "plan.ttp"),
            "--personalize", "ditto", *extra]
    # Execute
    r = agent(*args)
    # Assert
    assert r.returncode == 2 and "Traceback" not in r.stderr and words in r.stderr, r.stderr


def test_personalized_agent_reaches_the_broker_step(files):  # noqa: F811
    args = ["--broker", f"mqtt://127.0.0.1:{free_port()}", "--id", "d1", "--insecure-unsigned",
            "--connect-timeout", "1", "--data", str(files / "good.npz"), "--plan", str(files / "plan.ttp"),
            "--personalize", "head", "--buffer-policy", "reservoir"]
    r = agent(*args)
    assert r.returncode == 2 and "127.0.0.1" in r.stderr and "personalize" not in r.stderr, r.stderr
