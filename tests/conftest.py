"""Shared fixtures: real gRPC servers on free ports, served from a background event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from typing import Callable, Iterable, Iterator

import grpc
import pytest

from epgrpo.services.common.server import RunningServer, ServerConfig, start_server

# Keep test caches (trained reward classifiers, pretrained toy models) out of the user's home
# but shared across tests of one session.
os.environ.setdefault("EPGRPO_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "test"))


def _apply_test_torch_threads() -> None:
    """EPGRPO_TEST_TORCH_THREADS=N runs the in-process torch work on N threads: another thread count
    sums in another order, as another CPU's kernels do, so a test that only passes on this machine's
    exact bits flips under it (the fragility sweep in docs; with OMP_NUM_THREADS=1 for subprocesses)."""
    value = os.environ.get("EPGRPO_TEST_TORCH_THREADS", "")
    if not value:
        return
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"EPGRPO_TEST_TORCH_THREADS: expected a positive integer, got {value!r}")
    import torch

    torch.set_num_threads(int(value))


_apply_test_torch_threads()


class BackgroundServer:
    """Runs ``start_server(register, config)`` on an event loop in a daemon thread."""

    def __init__(self, register: Callable[[grpc.aio.Server], Iterable[str]], config: ServerConfig | None = None):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.running: RunningServer = self.call(start_server(register, config or ServerConfig()))
        self.port = self.running.port
        self.address = f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 60.0):
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, grace_s: float = 0.5) -> None:
        if self._loop.is_closed():
            return
        self.call(self.running.stop(grace_s))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """A test that runs a CLI in-process may point the root logger at pytest's captured stderr;
    background servers of later tests would then log into a closed stream."""
    import logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


@pytest.fixture
def background_server():
    """Factory: ``background_server(register, config=None) -> BackgroundServer``; stopped at teardown."""
    servers: list[BackgroundServer] = []

    def factory(register, config: ServerConfig | None = None) -> BackgroundServer:
        server = BackgroundServer(register, config)
        servers.append(server)
        return server

    yield factory
    for server in reversed(servers):
        server.stop()


@pytest.fixture(scope="session")
def tiny_policy_factory():
    """Builds toy digit policies from a tiny cached base model (a few pretraining steps)."""
    from epgrpo.trainer.policy.toy import ToyDigitPolicy, ToyRecipe, ensure_pretrained

    recipe = ToyRecipe(pretrain_steps=3, batch_size=16)
    path = ensure_pretrained(recipe, progress=False)

    def factory(**kwargs) -> ToyDigitPolicy:
        return ToyDigitPolicy(path, recipe, progress=False, **kwargs)

    return factory


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny random StableDiffusion3Pipeline saved with save_pretrained (see tests/tiny_sd3.py)."""
    from tiny_sd3 import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random StableDiffusionPipeline (SD 1.x layout, DDIM scheduler; see tests/tiny_sd.py)."""
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A tiny random FluxPipeline with a guidance embedding (see tests/tiny_flux.py)."""
    from tiny_flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """name -> the tiny pipeline of a 2026 image family (tests/image_families.py), built on first use."""
    from image_families import FAMILIES

    built = {}

    def get(name: str):
        if name not in built:
            built[name] = FAMILIES[name].builder(tmp_path_factory.mktemp(f"tiny-{name}"))
        return built[name]

    return get


@pytest.fixture
def sd3_services(background_server, tiny_sd3_dir):
    """(reward, pruner) for the tiny SD3 pipeline: JPEG compressibility, and a pruner decoding its
    previews with the pipeline's VAE under the name 'tiny-sd3-vae'."""
    from epgrpo.services.pruner.decode import register_vae_decoder
    from epgrpo.services.pruner.main import build_registrar as pruner_registrar
    from epgrpo.services.reward.main import build_registrar as reward_registrar

    register_vae_decoder("tiny-sd3-vae", tiny_sd3_dir)  # what `epgrpo-pruner --vae tiny-sd3-vae=DIR` does
    reward = background_server(reward_registrar(["jpeg_compressibility"]))
    pruner = background_server(pruner_registrar(reward.address))
    return reward, pruner


def send_chat_answer(handler, answer: str) -> None:
    """Answers an OpenAI-compatible /v1/chat/completions request (a fake VLM judge's reply)."""
    import json

    payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


@contextlib.contextmanager
def http_server(handler_class) -> Iterator[str]:
    """A threaded HTTP server on a free loopback port; yields its base URL."""
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now; nobody listens on it once this returns."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


SERVED_REWARDS = ("digit", "digit_judge", "jpeg_compressibility")


@pytest.fixture(scope="session")
def services():
    """(reward, pruner): a reward service serving SERVED_REWARDS and a pruner scoring previews with it,
    BackgroundServers on free ports shared by the session (both keep no state between calls)."""
    from epgrpo.services.pruner.main import build_registrar as pruner_registrar
    from epgrpo.services.reward.main import build_registrar as reward_registrar

    reward = BackgroundServer(reward_registrar(list(SERVED_REWARDS)))
    pruner = BackgroundServer(pruner_registrar(reward.address))
    yield reward, pruner
    pruner.stop()
    reward.stop()
