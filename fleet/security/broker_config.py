"""`tinyfleet broker-config`: a Mosquitto 2.x config with one user per device, a ``%u`` ACL, and TLS.

Edge gateways: ``--site NAME=IDS`` (repeatable) writes a central broker whose bridge user per site may speak only
for that site's devices; ``--bridge HOST:PORT --site-name NAME --central DIR`` then writes that site's broker (its
devices' users and ACL, no coordinator) bridged to the central one (:func:`bridge_lines`).

Writes into ``--out``: ``mosquitto.conf``, ``passwd`` (PBKDF2-SHA512 hashes in Mosquitto's ``$7$`` format,
generated here so the coordinator host needs no ``mosquitto_passwd``), ``acl``, ``credentials.json`` (the clear
passwords, mode 0600: hand each device its own line, then keep or delete the file) and with ``--tls`` a CA
(``ca.crt``, ``ca.key`` 0600: move the key offline) and a server certificate signed by it. Re-running on the same
directory keeps existing passwords and the CA (adding a device rotates nobody); ``--rotate`` makes new ones.

It refuses device ids that are not MQTT-topic-safe or that equal the coordinator's user name, and it never
starts a broker or speaks MQTT.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import pwd
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from device_agent.wire.messages import DEVICE_DOWN, DEVICE_UP

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # as device_agent.wire.messages: no '/', '+', '#', no '%'
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes; the password itself carries the entropy (128 bits)
DEFAULT_MAX_PACKET = 1 << 20  # bytes; must exceed the largest plan blob (retained, published by the coordinator)
COORDINATOR_USER = "coordinator"


class BrokerConfigError(ValueError):
    """Bad input to the config writer (device id, fleet name, sizes); the message says what was expected."""


@dataclass(frozen=True)
class Bridge:
    """A site broker's link to the central broker: the site's name, the central's ``host:port``, the password of
    the site's bridge user there (:func:`bridge_user`) and, for a TLS central, its CA certificate."""

    site: str
    address: str
    password: str
    ca_file: Path | None = None


@dataclass(frozen=True)
class BrokerFiles:
    """Paths written by :func:`write_broker_config` and the credentials they hold."""

    conf: Path
    passwd: Path
    acl: Path
    credentials: Path
    ca_cert: Path | None
    port: int
    tls: bool
    coordinator: tuple[str, str] | None  # (username, password); None on a site broker (no coordinator there)
    devices: dict[str, str]  # device id -> password
    sites: dict[str, dict] | None = None  # central broker: site -> {"password": bridge password, "devices": [...]}


# --- passwords ----------------------------------------------------------------------------------------------


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """Mosquitto's ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-HMAC-SHA512>`` line value (salt 12 bytes)."""
    salt = secrets.token_bytes(12) if salt is None else salt
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def check_password(password: str, line_value: str) -> bool:
    """True if ``password`` matches a ``$7$`` hash (for tests and ``--rotate`` decisions)."""
    _, seven, it, salt, dk = line_value.split("$")
    if seven != "7":
        return False
    want = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(it), 64)
    return secrets.compare_digest(want, base64.b64decode(dk))


# --- ACL ----------------------------------------------------------------------------------------------------


def bridge_user(site: str) -> str:
    """The user a site broker's bridge logs in as at the central broker."""
    return f"bridge-{site}"


def site_acl(fleet: str, site: str, devices: list[str]) -> list[str]:
    """Central-broker ACL lines of one site's bridge: exactly its own devices' topics, as each device's own ACL
    gives it at the site, so a site (or a stolen bridge password) cannot speak for another site's devices."""
    p = f"tinyfleet/{fleet}"
    return [f"user {bridge_user(site)}",
            *(f"topic write {p}/dev/{d}/{k}" for d in devices for k in DEVICE_UP),
            *(f"topic read {p}/dev/{d}/{k}" for d in devices for k in DEVICE_DOWN),
            f"topic read {p}/model/current",
            f"topic read {p}/plan/+"]


def acl_text(fleet: str, coordinator: str | None = COORDINATOR_USER, sites: dict[str, list[str]] | None = None) -> str:
    """The ACL: the coordinator by name, every device by ``%u`` pattern (username = device id).

    Mosquitto grants nothing that is not listed. A device writes only its own hello/status/delta/secagg (the
    Last Will is its status topic) and reads only its own task, ack, model and secagg_relay plus the retained
    model and plans: secure-aggregation keys and shares between devices always pass through the coordinator.
    """
    p = f"tinyfleet/{fleet}"
    coord = [] if coordinator is None else [
        f"user {coordinator}",
        *(f"topic read {p}/dev/+/{k}" for k in DEVICE_UP),
        f"topic read $share/+/{p}/dev/+/delta",  # aggregation workers (fleet/coordinator/pool.py)
        *(f"topic write {p}/dev/+/{k}" for k in DEVICE_DOWN),
        f"topic readwrite {p}/model/current",
        f"topic readwrite {p}/plan/+",
        f"topic readwrite {p}/flower/#",  # a Flower ServerApp's lock and run state (docs/protocol.md)
    ]
    bridges = [line for site, devs in sorted((sites or {}).items()) for line in ["", *site_acl(fleet, site, devs)]]
    return "\n".join([
        "# generated by tinyfleet broker-config — do not edit (re-run the command instead)",
        *coord,
        *bridges,
        "",
        "# every other user is a device whose username is its device id",
        *(f"pattern write {p}/dev/%u/{k}" for k in DEVICE_UP),
        *(f"pattern read {p}/dev/%u/{k}" for k in DEVICE_DOWN),
        f"pattern read {p}/model/current",
        f"pattern read {p}/plan/+",
        "",
    ])


# --- TLS ----------------------------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    """Create (or truncate) ``path`` with mode 0600 before any byte is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def make_tls(out: Path, hostnames: list[str], days: int = 825, rotate: bool = False) -> tuple[Path, Path, Path]:
    """A P-256 CA (kept if present and not ``rotate``) and a server cert for ``hostnames`` (DNS names or IPs).

    Returns ``(ca.crt, server.crt, server.key)``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_crt, ca_key_p = out / "ca.crt", out / "ca.key"
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    pem = serialization.Encoding.PEM
    if ca_crt.exists() and ca_key_p.exists() and not rotate:
        ca_key = serialization.load_pem_private_key(ca_key_p.read_bytes(), None)
        ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TinyFleet broker CA")])
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now)
              .not_valid_after(now + dt.timedelta(days=3650))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
        _write_private(ca_key_p, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
        ca_crt.write_bytes(ca.public_bytes(pem))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    srv_crt, srv_key = out / "server.crt", out / "server.key"
    srv_crt.write_bytes(cert.public_bytes(pem))
    _write_private(srv_key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_crt, srv_crt, srv_key


def _default_broker_user() -> str | None:
    """As root, Mosquitto drops to the ``mosquitto`` user (Debian's package creates it) unless told otherwise."""
    try:
        return pwd.getpwnam("mosquitto").pw_name
    except KeyError:
        return None


# --- the whole config ---------------------------------------------------------------------------------------


def _check_ids(fleet: str, devices: list[str], coordinator: str, sites: dict[str, list[str]] | None = None) -> None:
    errs = []
    everyone = list(devices) + [d for devs in (sites or {}).values() for d in devs]
    for site, devs in (sites or {}).items():
        if not _ID.match(site):
            errs.append(f"site: names must match [A-Za-z0-9_.-]{{1,64}}, got {site!r}")
        if not devs:
            errs.append(f"site {site}: at least one device id expected")
    if not _ID.match(fleet):
        errs.append(f"fleet: must match [A-Za-z0-9_.-]{{1,64}}, got {fleet!r}")
    if not _ID.match(coordinator):
        errs.append(f"coordinator user: must match [A-Za-z0-9_.-]{{1,64}}, got {coordinator!r}")
    if not everyone:
        errs.append("devices: at least one device id expected")
    devices = everyone
    bad = [d for d in devices if not _ID.match(d)]
    if bad:
        errs.append(f"devices: ids must match [A-Za-z0-9_.-]{{1,64}} (they are MQTT topic levels), got {bad[:5]!r}")
    if coordinator in devices:
        errs.append(f"devices: {coordinator!r} is the coordinator's user name, not a device id")
    dups = sorted({d for d in devices if devices.count(d) > 1})
    if dups:
        errs.append(f"devices: duplicate ids {dups[:5]!r}")
    if errs:
        raise BrokerConfigError("; ".join(errs))


def write_broker_config(out: str | Path, fleet: str, devices: list[str], *, tls: bool = False, port: int | None = None,
                        bind: str = "0.0.0.0", hostnames: tuple[str, ...] = ("localhost", "127.0.0.1"),
                        max_packet_size: int = DEFAULT_MAX_PACKET, run_as: str | None = None,
                        coordinator: str = COORDINATOR_USER, rotate: bool = False,
                        sites: dict[str, list[str]] | None = None, bridge: Bridge | None = None) -> BrokerFiles:
    """Write the broker files for ``fleet`` into ``out`` and return their paths and the credentials.

    ``sites`` (the central broker of bridged sites): site name -> its device ids; each site gets a bridge user
    whose ACL holds exactly its devices' topics (sites named on an earlier run stay). ``bridge`` (a site broker):
    the site's ``devices`` connect here, no coordinator user, and a Mosquitto bridge carries their uplink topics
    to the central broker and its downlink topics back.
    """
    _check_ids(fleet, devices, coordinator, sites)
    if bridge is not None and sites:
        raise BrokerConfigError("a broker is either a site (bridge) or the central one (sites), not both")
    if not 1024 <= max_packet_size <= 268_435_455:  # MQTT's own limit is 256 MiB
        raise BrokerConfigError(f"max_packet_size: expected 1024 .. 268435455 bytes, got {max_packet_size}")
    port = port if port is not None else (8883 if tls else 1883)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    cred_p = out / "credentials.json"
    old = json.loads(cred_p.read_text()) if cred_p.exists() and not rotate else {}
    old_devs = old.get("devices", {}) if old.get("fleet") == fleet else {}

    def pw(existing: str | None) -> str:
        return existing or secrets.token_urlsafe(16)  # 128 bits

    coord_pw = pw(old.get("coordinator", {}).get("password") if old.get("fleet") == fleet else None)
    dev_pw = {d: pw(old_devs.get(d)) for d in devices}
    old_sites = old.get("sites", {}) if old.get("fleet") == fleet else {}
    all_sites = {**{k: v["devices"] for k, v in old_sites.items()}, **(sites or {})}
    site_creds = {k: {"password": pw(old_sites.get(k, {}).get("password")), "devices": list(v)}
                  for k, v in sorted(all_sites.items())}
    creds: dict = {"fleet": fleet, "devices": dev_pw}
    if bridge is None:
        creds["coordinator"] = {"username": coordinator, "password": coord_pw}
    if site_creds:
        creds["sites"] = site_creds
    _write_private(cred_p, (json.dumps(creds, indent=1, sort_keys=True) + "\n").encode())
    passwd = out / "passwd"
    lines = [f"{coordinator}:{hash_password(coord_pw)}"] if bridge is None else []
    lines += [f"{d}:{hash_password(p)}" for d, p in dev_pw.items()]
    lines += [f"{bridge_user(k)}:{hash_password(v['password'])}" for k, v in site_creds.items()]
    _write_private(passwd, ("\n".join(lines) + "\n").encode())
    acl = out / "acl"
    _write_private(acl, acl_text(fleet, coordinator if bridge is None else None,
                                 {k: v["devices"] for k, v in site_creds.items()}).encode())
    persist = out / "data"
    persist.mkdir(exist_ok=True)
    conf_lines = [
        "# generated by tinyfleet broker-config — do not edit (re-run the command instead)",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {passwd}",
        f"acl_file {acl}",
        f"max_packet_size {max_packet_size}",  # larger packets: the client is disconnected, nothing is routed
        "max_inflight_messages 100",
        "max_queued_messages 100000",
        "persistence true",
        f"persistence_location {persist}/",
        "autosave_interval 1",
        "log_type error", "log_type warning", "log_type notice", "connection_messages true",
        f"log_dest file {out / 'mosquitto.log'}",
    ]
    conf_lines.append(f"listener {port} {bind}")
    if run_as is None and os.geteuid() == 0:
        run_as = _default_broker_user()
    ca_cert = None
    if tls:
        ca_cert, srv_crt, srv_key = make_tls(out, list(hostnames), rotate=rotate)
        conf_lines += [f"cafile {ca_cert}", f"certfile {srv_crt}", f"keyfile {srv_key}",
                       "require_certificate false"]  # NOTE: no tls_version: Mosquitto then allows TLS 1.2 and 1.3
    else:
        conf_lines.append("# WARNING: no TLS: passwords and payloads cross the network in clear (use --tls)")
    if run_as:
        conf_lines.append(f"user {run_as}")  # NOTE: the secret files are 0600: mosquitto must run as their owner
    if bridge is not None:
        conf_lines += bridge_lines(fleet, bridge)
    conf = out / "mosquitto.conf"
    conf.write_text("\n".join(conf_lines) + "\n")
    if run_as and os.geteuid() == 0:  # the broker drops to ``run_as``: it must own what it reads and writes
        ent = pwd.getpwnam(run_as)
        for path in (out, passwd, acl, persist, *([out / "server.key"] if tls else [])):
            os.chown(path, ent.pw_uid, ent.pw_gid)
    return BrokerFiles(conf, passwd, acl, cred_p, ca_cert, port, tls, None if bridge else (coordinator, coord_pw),
                       dev_pw, site_creds or None)


def bridge_lines(fleet: str, bridge: Bridge) -> list[str]:
    """The ``connection`` section of a site broker: device uplink out, downlink and the fleet's model and plans
    in, QoS 1 both ways, a persistent session at the central broker (what the central queued while the site was
    down arrives when it is back; what the site queued for the central likewise)."""
    p = f"tinyfleet/{fleet}"
    lines = [f"connection tinyfleet-{bridge.site}",
             f"address {bridge.address}",
             "bridge_protocol_version mqttv50",
             f"remote_clientid tinyfleet-bridge-{bridge.site}",
             f"local_clientid tinyfleet-bridge-{bridge.site}-local",
             f"remote_username {bridge_user(bridge.site)}",
             f"remote_password {bridge.password}",
             "cleansession false",  # NOTE: QoS 1 messages for a site that is down wait at the central broker
             "try_private true",
             "notifications false",
             "restart_timeout 1 10",
             *(f"topic {p}/dev/+/{k} out 1" for k in DEVICE_UP),
             *(f"topic {p}/dev/+/{k} in 1" for k in DEVICE_DOWN),
             f"topic {p}/model/current in 1",
             f"topic {p}/plan/+ in 1"]
    if bridge.ca_file is not None:
        lines.append(f"bridge_cafile {bridge.ca_file}")
    return lines


# --- CLI ----------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fleet", required=True, help="fleet name (the <fleet> topic level)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--devices", help="comma-separated device ids (each becomes an MQTT user)")
    g.add_argument("--devices-file", help="file with one device id per line ('#' comments allowed)")
    p.add_argument("--out", required=True, help="directory to write mosquitto.conf, passwd, acl, credentials")
    p.add_argument("--tls", action="store_true", help="TLS listener only, with a generated CA + server cert")
    p.add_argument("--port", type=int, default=None, help="listener port (default 8883 with --tls, else 1883)")
    p.add_argument("--bind", default="0.0.0.0", help="listener address (default 0.0.0.0)")
    p.add_argument("--hostname", action="append", default=None,
                   help="server certificate name (DNS or IP); repeat for several (default localhost, 127.0.0.1)")
    p.add_argument("--max-packet-size", type=int, default=DEFAULT_MAX_PACKET,
                   help=f"bytes; bigger packets disconnect their client (default {DEFAULT_MAX_PACKET})")
    p.add_argument("--run-as", default=None,
                   help="user mosquitto runs as; as root the broker's files are chowned to it "
                        "(default as root: 'mosquitto' if that user exists)")
    p.add_argument("--coordinator-user", default=COORDINATOR_USER)
    p.add_argument("--rotate", action="store_true", help="new passwords and a new CA even if files exist")
    p.add_argument("--site", action="append", default=[], metavar="NAME=ID,ID,...",
                   help="central broker of bridged sites: a site and its device ids (repeat per site); its bridge "
                        "user may speak only for those devices")
    p.add_argument("--bridge", metavar="HOST:PORT",
                   help="write a site broker for --devices, bridged to the central broker at HOST:PORT "
                        "(needs --site-name and --central)")
    p.add_argument("--site-name", help="with --bridge: this site's name, as given to the central's --site")
    p.add_argument("--central", type=Path, help="with --bridge: the central broker's --out directory (its "
                                                "credentials.json holds the bridge password, its ca.crt the CA)")


def _read_devices(args: argparse.Namespace) -> list[str]:
    if args.devices is None and args.devices_file is None:
        return []
    if args.devices is not None:
        return [d.strip() for d in args.devices.split(",") if d.strip()]
    lines = Path(args.devices_file).read_text().splitlines()
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


def _sites(specs: list[str]) -> dict[str, list[str]]:
    out = {}
    for spec in specs:
        name, eq, ids = spec.partition("=")
        if not eq or not name:
            raise BrokerConfigError(f"--site: expected NAME=ID,ID,..., got {spec!r}")
        out[name] = [d.strip() for d in ids.split(",") if d.strip()]
    return out


def site_bridge(central: Path, fleet: str, site: str, address: str, devices: list[str]) -> Bridge:
    """The :class:`Bridge` of ``site`` from the central broker's directory; refuses a device the central does
    not list for that site (its ACL there would drop the device's messages)."""
    cred = central / "credentials.json"
    try:
        creds = json.loads(cred.read_text())
    except (OSError, ValueError) as e:
        raise BrokerConfigError(f"--central {central}: cannot read credentials.json ({e}); write the central broker "
                                f"first (broker-config --site {site}=...)") from None
    if creds.get("fleet") != fleet or site not in creds.get("sites", {}):
        raise BrokerConfigError(f"--central {central}: no site {site!r} of fleet {fleet!r} there; re-run the "
                                f"central broker-config with --site {site}=<its device ids>")
    known = set(creds["sites"][site]["devices"])
    extra = [d for d in devices if d not in known]
    if extra:
        raise BrokerConfigError(f"devices {extra[:5]!r} are not listed for site {site!r} at the central broker: add "
                                f"them to its --site {site}=... and re-run it first")
    ca = central / "ca.crt"
    return Bridge(site, address, creds["sites"][site]["password"], ca if ca.exists() else None)


def run(args: argparse.Namespace) -> int:
    try:
        bridge = None
        sites = _sites(args.site)
        if args.bridge is not None:
            if not args.site_name or args.central is None:
                raise BrokerConfigError("--bridge needs --site-name NAME and --central DIR")
            bridge = site_bridge(args.central, args.fleet, args.site_name, args.bridge, _read_devices(args))
        elif args.devices is None and args.devices_file is None and not sites:
            raise BrokerConfigError("give --devices, --devices-file or (a central broker) --site NAME=IDS")
        files = write_broker_config(args.out, args.fleet, _read_devices(args), tls=args.tls, port=args.port,
                                    bind=args.bind, hostnames=tuple(args.hostname or ("localhost", "127.0.0.1")),
                                    max_packet_size=args.max_packet_size, run_as=args.run_as,
                                    coordinator=args.coordinator_user, rotate=args.rotate, sites=sites or None,
                                    bridge=bridge)
    except (BrokerConfigError, OSError) as e:
        print(f"tinyfleet broker-config: {e}", file=sys.stderr)
        return 2
    scheme = "mqtts" if files.tls else "mqtt"
    who = f"'{files.coordinator[0]}'" if files.coordinator else f"a bridge to {args.bridge}"
    sites_note = f", bridges of sites {', '.join(files.sites)}" if files.sites else ""
    print(f"wrote {files.conf} ({len(files.devices)} devices + {who}{sites_note})")
    print(f"credentials (mode 0600, give each device only its own): {files.credentials}")
    if files.ca_cert:
        print(f"clients trust {files.ca_cert}; move {files.ca_cert.with_suffix('.key')} offline")
    print(f"start: mosquitto -c {files.conf}   clients: {scheme}://<device id>:<password>@<host>:{files.port}")
    return 0
