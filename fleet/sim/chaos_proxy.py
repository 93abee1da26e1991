"""A loopback TCP proxy between MQTT clients and a broker that duplicates, delays and reorders PUBLISH packets.

It splits each direction's byte stream into MQTT packets (fixed header: type nibble + variable-length remaining
length; MQTT 3.1.1 and 5 alike) and forwards every packet unchanged and in order, except PUBLISH packets, which
it may (seeded, per packet) send twice (the copy with the DUP flag set when QoS > 0, as a retransmission looks),
or hold back for a random delay so that later packets overtake them (reordering). This is what a flaky network
plus QoS 1 retransmissions look like to both ends. It refuses to change payloads or to touch anything but PUBLISH
(a CONNECT or PUBACK out of order would be a protocol violation, not a network fault).
"""

from __future__ import annotations

import heapq
import random
import socket
import threading
import time
from dataclasses import dataclass

PUBLISH = 3


@dataclass
class ChaosStats:
    publishes: int = 0
    duplicated: int = 0
    delayed: int = 0
    reordered: int = 0  # packets sent after a packet that was read later than them


def split_packets(buf: bytearray) -> list[bytes]:
    """Remove and return the complete MQTT packets at the start of ``buf`` (an incomplete tail stays)."""
    out = []
    while len(buf) >= 2:
        length, mult, pos = 0, 1, 1
        while True:
            if pos >= len(buf):
                return out
            b = buf[pos]
            length += (b & 0x7F) * mult
            pos += 1
            if not b & 0x80:
                break
            mult *= 128
            if pos > 4:
                raise ValueError("malformed MQTT remaining length")
        if len(buf) < pos + length:
            return out
        out.append(bytes(buf[:pos + length]))
        del buf[:pos + length]
    return out


class _Pipe:
    """One direction of one connection: reader thread splits packets, sender thread sends them when due."""

    def __init__(self, proxy: ChaosProxy, src: socket.socket, dst: socket.socket):
        self.proxy, self.src, self.dst = proxy, src, dst
        self.heap: list[tuple[float, int, bytes | None]] = []
        self.cv = threading.Condition()
        self.seq = 0
        self.sent_max = -1
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._send, daemon=True).start()

    def _push(self, due: float, packet: bytes | None) -> None:
        with self.cv:
            heapq.heappush(self.heap, (due, self.seq, packet))
            self.seq += 1
            self.cv.notify()

    def _read(self) -> None:
        buf = bytearray()
        try:
            while True:
                data = self.src.recv(65536)
                if not data:
                    break
                buf += data
                for pkt in split_packets(buf):
                    for due, copy in self.proxy.schedule(pkt):
                        self._push(due, copy)
        except (OSError, ValueError):
            pass
        with self.cv:
            last = max((d for d, _, _ in self.heap), default=0.0)
        self._push(max(time.monotonic(), last), None)  # close after everything queued went out

    def _send(self) -> None:
        while True:
            with self.cv:
                while not self.heap or self.heap[0][0] > time.monotonic():
                    self.cv.wait(None if not self.heap else max(0.0, self.heap[0][0] - time.monotonic()))
                _, seq, pkt = heapq.heappop(self.heap)
            if pkt is None:
                break
            if seq < self.sent_max:
                self.proxy.count("reordered")
            self.sent_max = max(self.sent_max, seq)
            try:
                self.dst.sendall(pkt)
            except OSError:
                break
        for s in (self.src, self.dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ChaosProxy:
    """Listen on ``127.0.0.1:<port>`` and forward each connection to ``127.0.0.1:upstream``.

    ``dup``, ``delay`` are per-PUBLISH probabilities; a delayed packet waits ``U(0, max_delay)`` seconds.
    """

    def __init__(self, upstream: int, seed: int = 0, dup: float = 0.2, delay: float = 0.2, max_delay: float = 0.3):
        self.upstream, self.dup, self.delay, self.max_delay = upstream, dup, delay, max_delay
        self.rng = random.Random(seed)
        self.stats = ChaosStats()
        self._lock = threading.Lock()
        self._srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(64)
        self.port = self._srv.getsockname()[1]
        self._conns: list[socket.socket] = []

    def start(self) -> ChaosProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            setattr(self.stats, what, getattr(self.stats, what) + n)

    def schedule(self, pkt: bytes) -> list[tuple[float, bytes]]:
        """``(due, bytes)`` for each copy of ``pkt`` to send: itself now, or later, and maybe a duplicate."""
        now = time.monotonic()
        if pkt[0] >> 4 != PUBLISH:
            return [(now, pkt)]
        with self._lock:
            self.stats.publishes += 1
            late = self.rng.random() < self.delay
            twice = self.rng.random() < self.dup
            wait = self.rng.uniform(0, self.max_delay)
            wait2 = self.rng.uniform(0, self.max_delay)
            self.stats.delayed += late
            self.stats.duplicated += twice
        out = [(now + wait if late else now, pkt)]
        if twice:
            qos = (pkt[0] >> 1) & 3
            copy = bytes([pkt[0] | 0x08]) + pkt[1:] if qos else pkt
            out.append((now + wait2, copy))
        return out

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            try:
                broker = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
                broker.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, broker):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns += [client, broker]
            _Pipe(self, client, broker)
            _Pipe(self, broker, client)

    def close(self) -> None:
        try:
            self._srv.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
        except OSError:
            pass
        self._srv.close()
        for s in self._conns:
            try:
                s.close()
            except OSError:
                pass
