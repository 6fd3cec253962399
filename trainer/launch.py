"""Starts the reward and pruner services as local processes on free ports (the embedded default).

The services run exactly as a user would start them (``python -m epgrpo.services.<x>.main``); the
trainer only talks to them over gRPC. Each binds port 0 and reports its port through a file.
``LocalService`` also starts replicas on other loopback addresses, with TLS or tokens (tests).
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

from epgrpo.protos.channel import ChannelSecurity
from epgrpo.protos.cpu_threads import default_wait_policy, service_threads

log = logging.getLogger("epgrpo.launch")


class LocalService:
    """One service process; ``address`` once it reports SERVING. ``env`` is added to the
    environment; ``security`` is what the readiness probe needs (a TLS server's CA, ...)."""

    def __init__(self, name: str, module: str, args: list[str], log_dir: Path, startup_timeout_s: float = 300.0,
                 host: str = "127.0.0.1", env: dict[str, str] | None = None,
                 security: ChannelSecurity = ChannelSecurity()):
        self.name = name
        self._tmp = tempfile.TemporaryDirectory(prefix=f"epgrpo-{name}-")
        port_file = Path(self._tmp.name) / "port"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        default_wait_policy(child_env)  # idle OpenMP threads sleep: the service shares cores with the trainer
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "--host", host, "--port", "0", "--port-file", str(port_file), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=child_env,
        )
        deadline = time.monotonic() + startup_timeout_s
        while not port_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} service exited with code {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{name} service did not start within {startup_timeout_s:.0f}s; see {self.log_path}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.address = f"{host}:{self.port}"
        try:
            wait_serving(self.address, timeout_s=max(1.0, deadline - time.monotonic()), security=security)
        except BaseException:
            self.stop()  # never leave a half-started process behind
            raise
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

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to drain or say goodbye (fault injection)."""
        self.process.kill()
        self.process.wait()


def wait_serving(address: str, timeout_s: float = 30.0, security: ChannelSecurity = ChannelSecurity()) -> None:
    """Polls the gRPC health service (no token needed) until it reports SERVING."""
    deadline = time.monotonic() + timeout_s
    credentials = security.credentials()
    options = [("grpc.ssl_target_name_override", security.server_name)] if security.server_name else []
    channel = grpc.secure_channel(address, credentials, options=options) if credentials else grpc.insecure_channel(address)
    with channel:
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

    def __init__(self, rewards: list[str], log_dir: Path, device: str = "cpu",
                 decoders: dict[str, str] | None = None, decoder_device: str = "cpu",
                 reward_routes: dict[str, str] | None = None):
        """``decoders``: preview decoders the pruner serves, name -> VAE directory (latent models);
        ``reward_routes``: rewards the pruner scores at another service, name -> address."""
        self.services: list[LocalService] = []
        # the services share the trainer's cores: a smaller thread team each (EPGRPO_SERVICE_TORCH_THREADS
        # overrides; with OMP_NUM_THREADS set they inherit it); see protos/cpu_threads.py
        threads = service_threads()
        thread_args = ["--torch-threads", str(threads)] if threads is not None else []
        pruner_args = [arg for name, address in (reward_routes or {}).items()
                       for arg in ("--reward-route", f"{name}={address}")]
        if decoders:
            pruner_args += [arg for name, path in decoders.items() for arg in ("--vae", f"{name}={path}")]
            pruner_args += ["--device", decoder_device, *thread_args]
        try:
            self.reward = self._start("reward", "epgrpo.services.reward.main",
                                      ["--rewards", ",".join(rewards), "--device", device, *thread_args], log_dir)
            self.pruner = self._start("pruner", "epgrpo.services.pruner.main",
                                      ["--reward-address", self.reward.address, *pruner_args], log_dir)
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
