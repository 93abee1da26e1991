"""Ed25519 / SHA-512 vectors for the firmware verifier (firmware/tests/crypto/test_ed25519.c).

RFC 8032 section 7.1 TEST 1-3 are re-signed here with the ``cryptography`` package from their published seeds
and checked against the published public keys and signatures; a multi-block message adds a 1023-byte case.
Each case is then mutated (a flipped bit in R, S, the message, the public key; S + L; S = L; public keys that
do not decode or are of small order) and every mutation carries the verdict of ``cryptography`` (OpenSSL), which
the C verifier must reproduce, except where OpenSSL accepts a public key RFC 8032 5.1.3 refuses to decode
(y >= p, or x = 0 with the sign bit): the C verifier follows the RFC (a fleet key is ours and canonical). Key slot records (device_agent/wire/keyslot.py)
and their mutations carry the code and policy of the Python reader, which tf_key_slot_read must reproduce. SHA-512 digests at the padding boundaries come from ``hashlib``.

    python tests/firmware/gen_ed25519_vectors.py   # writes firmware/tests/crypto/ed25519_vectors.h
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_agent.wire.envelope import FormatId, SigAlg, Signer, seal
from device_agent.wire.errors import WireFormatError
from device_agent.wire.keyslot import SLOT_BYTES, key_slot_from_bytes, key_slot_to_bytes

OUT = ROOT / "firmware" / "tests" / "crypto" / "ed25519_vectors.h"
L = 2**252 + 27742317777372353535851937790883648493
P = 2**255 - 19

# RFC 8032 7.1: (seed, public key, message, signature), as published
RFC = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
]


def verdict(pub: bytes, sig: bytes, msg: bytes) -> int:
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(sig, msg)
        return 1
    except (InvalidSignature, ValueError):
        return 0


def canonical_key(pub: bytes) -> bool:
    """RFC 8032 5.1.3 refuses y >= p and x = 0 with the sign bit set; OpenSSL decodes both (y mod p, x = 0)."""
    n = int.from_bytes(pub, "little")
    y, sign_bit = n & (2**255 - 1), n >> 255
    return y < P and not (sign_bit and y * y % P == 1)


def rfc_verdict(pub: bytes, sig: bytes, msg: bytes) -> int:
    """RFC 8032 5.1.7: OpenSSL's verdict, except for the non-canonical public keys it accepts."""
    return verdict(pub, sig, msg) if canonical_key(pub) else 0


def sign(seed: bytes, msg: bytes) -> tuple[bytes, bytes]:
    key = Ed25519PrivateKey.from_private_bytes(seed)
    return key.public_key().public_bytes_raw(), key.sign(msg)


def cases() -> list[tuple[str, bytes, bytes, bytes]]:
    """(name, pub, sig, msg) of every case, valid ones and mutations."""
    base = []
    for i, (seed, pub, msg, sig) in enumerate(RFC, 1):
        got_pub, got_sig = sign(bytes.fromhex(seed), bytes.fromhex(msg))
        assert got_pub.hex() == pub and got_sig.hex() == sig, f"RFC 8032 TEST {i} not reproduced"
        base.append((f"rfc8032 test {i}", got_pub, got_sig, bytes.fromhex(msg)))
    long_msg = bytes((i * 7 + 3) & 0xFF for i in range(1023))
    pub, sig = sign(hashlib.sha256(b"tinyfleet ed25519 vectors").digest(), long_msg)
    base.append(("1023-byte message", pub, sig, long_msg))
    out = list(base)
    for name, pub, sig, msg in base:
        s = int.from_bytes(sig[32:], "little")
        for bit in (0, 100, 255):
            out.append((f"{name}, R bit {bit} flipped", pub, flip(sig, bit), msg))
        for bit in (256, 300, 500):
            out.append((f"{name}, S bit {bit - 256} flipped", pub, flip(sig, bit), msg))
        for bit in (0, 130, 254, 255):
            out.append((f"{name}, pub bit {bit} flipped", flip(pub, bit), sig, msg))
        if msg:
            out.append((f"{name}, msg bit 0 flipped", pub, sig, flip(msg, 0)))
            out.append((f"{name}, msg cut by one byte", pub, sig, msg[:-1]))
        else:
            out.append((f"{name}, msg one byte longer", pub, sig, b"\0"))
        out.append((f"{name}, S + L", pub, sig[:32] + (s + L).to_bytes(32, "little"), msg))
        out.append((f"{name}, S = L", pub, sig[:32] + L.to_bytes(32, "little"), msg))
        out.append((f"{name}, S = 2^256 - 1", pub, sig[:32] + b"\xff" * 32, msg))
    name, pub, sig, msg = base[0]
    odd = [  # public keys that do not decode (RFC 8032 5.1.3), or decode to points of small order
        ("pub y = p (non-canonical 0)", P.to_bytes(32, "little")),
        ("pub y = p + 1 (non-canonical 1)", (P + 1).to_bytes(32, "little")),
        ("pub y = 2^255 - 1", (2**255 - 1).to_bytes(32, "little")),
        ("pub identity (y = 1)", (1).to_bytes(32, "little")),
        ("pub y = 1, x = 0 with sign 1", (1 + 2**255).to_bytes(32, "little")),
        ("pub y = 2 (x^2 not a square)", (2).to_bytes(32, "little")),
        ("pub y = 0 (order 4)", bytes(32)),
        ("pub y = -1 (order 2)", (P - 1).to_bytes(32, "little")),
    ]
    for what, bad_pub in odd:
        out.append((f"{what}, test 1 signature", bad_pub, sig, msg))
    # identity key with R = identity, S = 0: [0]B = R + [k]O for every k
    ident = (1).to_bytes(32, "little")
    out.append(("identity key, R = identity, S = 0", ident, ident + bytes(32), b"anything"))
    # the same forgery under non-canonical encodings: of the key (y = p + 1; x = 0 with the sign bit), of R
    for what, key, r in (("key y = p + 1", (P + 1).to_bytes(32, "little"), ident),
                         ("key x = 0 with sign 1", (1 + 2**255).to_bytes(32, "little"), ident),
                         ("R y = p + 1", ident, (P + 1).to_bytes(32, "little")),
                         ("R x = 0 with sign 1", ident, (1 + 2**255).to_bytes(32, "little"))):
        out.append((f"identity forgery, non-canonical {what}", key, r + bytes(32), b"anything"))
    return out


def flip(b: bytes, bit: int) -> bytes:
    a = bytearray(b)
    a[bit // 8] ^= 1 << (bit % 8)
    return bytes(a)


def key_slots() -> list[tuple[str, bytes, int, int]]:
    """(name, slot bytes, WireError code, policy alg) as device_agent.wire.keyslot reads them (damaged: fail
    closed, alg 1 without a key)."""
    pub = bytes.fromhex(RFC[0][1])
    ed, hm = key_slot_to_bytes(SigAlg.ED25519, pub), key_slot_to_bytes(SigAlg.HMAC_SHA256, b"device key 01234")
    slots = [("Ed25519 key", ed), ("HMAC key", hm), ("erased 0x00", b""), ("erased 0xff", b"\xff" * SLOT_BYTES),
             ("bad magic", b"TFKZ" + ed[4:]), ("version 2", ed[:4] + b"\x02\x00" + ed[6:]),
             ("sig_alg 0", ed[:6] + b"\x00\x00" + ed[8:]), ("sig_alg 3", ed[:6] + b"\x03\x00" + ed[8:]),
             ("Ed25519 key_len 33", ed[:8] + b"\x21\x00\x00\x00" + ed[12:]),
             ("HMAC key_len 15", hm[:8] + b"\x0f\x00\x00\x00" + hm[12:]),
             ("key bit flipped", ed[:12] + bytes([ed[12] ^ 1]) + ed[13:]), ("CRC flipped", ed[:-1] + bytes([ed[-1] ^ 1]))]
    out = []
    for name, rec in slots:
        slot = rec + bytes(SLOT_BYTES - len(rec))
        try:
            alg, _ = key_slot_from_bytes(slot)
            out.append((name, slot, 0, int(alg)))
        except WireFormatError as e:
            out.append((name, slot, int(e.code), 1))
    return out


def c_bytes(b: bytes) -> str:
    if not b:
        return "{0}"
    return "{" + ", ".join(f"0x{x:02x}" for x in b) + "}"


def main() -> None:
    lines = ["/* generated by tests/firmware/gen_ed25519_vectors.py — do not edit */",
             "/* RFC 8032 TEST 1-3 + a 1023-byte message, their mutations with the RFC 8032 verdict and that of OpenSSL,",
             " * and SHA-512 digests at the padding boundaries (hashlib). */",
             "#ifndef TF_ED25519_VECTORS_H", "#define TF_ED25519_VECTORS_H", "", "#include <stdint.h>", ""]
    cs = cases()
    for i, (_, pub, sig, msg) in enumerate(cs):
        lines.append(f"static const uint8_t ED_MSG_{i}[] = {c_bytes(msg)};")
    lines += ["", "typedef struct {", "    const char *name;", "    uint8_t pub[32], sig[64];",
              "    const uint8_t *msg;", "    uint32_t msg_len;", "    int valid;   /* RFC 8032 verdict */",
              "    int openssl; /* verdict of cryptography (OpenSSL): differs only for non-canonical keys */",
              "} ed_case;", "", "static const ed_case ED_CASES[] = {"]
    for i, (name, pub, sig, msg) in enumerate(cs):
        lines.append(f'    {{"{name}", {c_bytes(pub)},\n     {c_bytes(sig)},\n     ED_MSG_{i}, {len(msg)}, '
                     f"{rfc_verdict(pub, sig, msg)}, {verdict(pub, sig, msg)}}},")
    lines += ["};", ""]
    lines += ["/* SHA-512 of bytes i * 13 + 1 (mod 256), i < len */", "typedef struct {", "    uint32_t len;",
              "    uint8_t digest[64];", "} sha512_case;", "", "static const sha512_case SHA512_CASES[] = {"]
    for n in (0, 1, 3, 111, 112, 127, 128, 129, 239, 240, 1000):
        data = bytes((i * 13 + 1) & 0xFF for i in range(n))
        lines.append(f"    {{{n}, {c_bytes(hashlib.sha512(data).digest())}}},")
    lines += ["};", "", "/* key slots (device_agent/wire/keyslot.py) and the code + policy the reader gives */",
              "typedef struct {", "    const char *name;", f"    uint8_t slot[{SLOT_BYTES}];", "    int code, alg;",
              "} key_slot_case;", "", "static const key_slot_case KEY_SLOT_CASES[] = {"]
    for name, slot, code, alg in key_slots():
        lines.append(f'    {{"{name}", {c_bytes(slot)}, {code}, {alg}}},')
    lines += ["};", ""]
    fmt = FormatId("test", b"TEST", 1, "")
    signer = Signer.ed25519(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(RFC[0][0])))
    for name, blob in (("ENV_ED25519", seal(fmt, b"hello, board", signer)), ("ENV_UNSIGNED", seal(fmt, b"hello"))):
        lines.append("/* envelope \"TEST\" v1 signed with the RFC 8032 TEST 1 key (= the \"Ed25519 key\" slot) */"
                     if name == "ENV_ED25519" else "/* the same envelope format, unsigned */")
        lines.append(f"static const uint8_t {name}[{len(blob)}] = {c_bytes(blob)};")
    lines += ["", "#endif /* TF_ED25519_VECTORS_H */", ""]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))
    valid = sum(rfc_verdict(p, s, m) for _, p, s, m in cs)
    differ = sum(rfc_verdict(p, s, m) != verdict(p, s, m) for _, p, s, m in cs)
    print(f"wrote {OUT}: {len(cs)} Ed25519 cases ({valid} valid, {differ} where OpenSSL accepts a non-canonical key)")


if __name__ == "__main__":
    main()
