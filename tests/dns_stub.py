"""A tiny authoritative DNS responder on loopback for tests: plays Docker's embedded DNS, where a
service name resolves to the addresses of all its replicas. Clients reach it with gRPC targets
``dns://127.0.0.1:<port>/<name>:<port>``. Answers A queries from ``records``; anything else
gets an empty answer. Bounded: serves only until ``close()``."""

from __future__ import annotations

import socket
import struct
import threading


class DnsStub:
    def __init__(self, records: dict[str, list[str]]):
        self.records = records  # mutable: tests may add replicas
        self.queries: list[str] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.address = "127.0.0.1:%d" % self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def target(self, name: str, port: int) -> str:
        return f"dns://{self.address}/{name}:{port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(512)
            except (socket.timeout, OSError):
                continue
            try:
                self._sock.sendto(self._answer(data), peer)
            except (ValueError, IndexError, struct.error, OSError):
                continue  # malformed query: ignore, like a real server would

    def _answer(self, query: bytes) -> bytes:
        qid = struct.unpack(">H", query[:2])[0]
        labels, i = [], 12
        while query[i]:
            labels.append(query[i + 1: i + 1 + query[i]].decode())
            i += query[i] + 1
        qtype = struct.unpack(">H", query[i + 1: i + 3])[0]
        name = ".".join(labels).lower()
        self.queries.append(name)
        ips = self.records.get(name, []) if qtype == 1 else []
        answers = b"".join(struct.pack(">HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(ip) for ip in ips)
        # Header: same id, response + recursion available, 1 question, len(ips) answers.
        return struct.pack(">HHHHHH", qid, 0x8180, 1, len(ips), 0, 0) + query[12: i + 5] + answers

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
