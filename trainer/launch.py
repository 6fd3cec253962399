"""Starts the reward and pruner services as local processes on free ports (the embedded default).

The services run exactly as a user would start them (``python -m epgrpo.services.<x>.main``); the
trainer only talks to them over gRPC. Each binds port 0 and reports its port through a file.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("epgrpo.launch")


class LocalService:
    def __init__(self, name: str, module: str, args: list[str], log_dir: Path, startup_timeout_s: float = 300.0):
        self.name = name
        self._tmp = tempfile.TemporaryDirectory(prefix=f"epgrpo-{name}-")
        port_file = Path(self._tmp.name) / "port"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "--port", "0", "--port-file", str(port_file), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + startup_timeout_s
        while not port_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} service exited with code {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{name} service did not start within {startup_timeout_s:.0f}s; see {self.log_path}")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{int(port_file.read_text())}"
        wait_serving(self.address, timeout_s=max(1.0, deadline - time.monotonic()))
        log.info("%s service serving at %s (log: %s)", name, self.address, self.log_path)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self._tmp.cleanup()
        return self.process.returncode


def wait_serving(address: str, timeout_s: float = 30.0) -> None:
    """Polls the gRPC health service until it reports SERVING."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not report SERVING within {timeout_s:.0f}s")
            time.sleep(0.1)


class LocalStack:
    """Reward + pruner services for one training run; a context manager that stops both."""

    def __init__(self, rewards: list[str], log_dir: Path, device: str = "cpu"):
        self.services: list[LocalService] = []
        try:
            self.reward = self._start("reward", "epgrpo.services.reward.main",
                                      ["--rewards", ",".join(rewards), "--device", device], log_dir)
            self.pruner = self._start("pruner", "epgrpo.services.pruner.main",
                                      ["--reward-address", self.reward.address], log_dir)
        except BaseException:
            self.stop()
            raise

    def _start(self, *args) -> LocalService:
        service = LocalService(*args)
        self.services.append(service)
        return service

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services.clear()

    def __enter__(self) -> "LocalStack":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
