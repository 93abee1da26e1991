"""`tinyfleet broker-config --site / --bridge`: the central broker's per-site bridge ACL and a site's bridge section."""

from __future__ import annotations

import os
import pwd

from fleet.cli import main


def test_central_then_site_write_a_bridge_that_speaks_only_for_its_devices(tmp_path, capsys):
    me = pwd.getpwuid(os.geteuid()).pw_name
    # Execute: the central broker with two sites, then site A's broker bridged to it
    assert main(["broker-config", "--fleet", "f", "--out", str(tmp_path / "c"), "--port", "18830", "--run-as", me,
                 "--site", "A=a0,a1", "--site", "B=b0"]) == 0
    assert main(["broker-config", "--fleet", "f", "--out", str(tmp_path / "a"), "--port", "18831", "--run-as", me,
                 "--devices", "a0,a1", "--bridge", "central.example:18830", "--site-name", "A",
                 "--central", str(tmp_path / "c")]) == 0
    # Assert: central ACL: bridge-A writes a0/a1 uplinks only; the site has the bridge and no coordinator
    acl = (tmp_path / "c" / "acl").read_text()
    block = acl.split("user bridge-A\n")[1].split("\n\n")[0]
    assert "topic write tinyfleet/f/dev/a0/delta" in block and "dev/b0" not in block
    assert "topic read tinyfleet/f/dev/a1/task" in block
    conf = (tmp_path / "a" / "mosquitto.conf").read_text()
    assert "address central.example:18830" in conf and "remote_username bridge-A" in conf
    assert "topic tinyfleet/f/dev/+/delta out 1" in conf and "topic tinyfleet/f/dev/+/task in 1" in conf
    assert "coordinator" not in (tmp_path / "a" / "passwd").read_text()
    # a device the central does not list for the site, or an unknown site, is refused with what to do
    capsys.readouterr()
    assert main(["broker-config", "--fleet", "f", "--out", str(tmp_path / "a2"), "--devices", "a0,b0",
                 "--bridge", "h:1", "--site-name", "A", "--central", str(tmp_path / "c")]) == 2
    assert "not listed for site 'A'" in capsys.readouterr().err
    assert main(["broker-config", "--fleet", "f", "--out", str(tmp_path / "z"), "--devices", "z0",
                 "--bridge", "h:1", "--site-name", "Z", "--central", str(tmp_path / "c")]) == 2
    assert "--site Z=" in capsys.readouterr().err
