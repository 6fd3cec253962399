"""TLS, mutual TLS, bearer tokens and the loopback-only default, on real servers and clients.

Certificates come from a throwaway CA made per test module (``tests/certs.py``). The services
under test are the real pruner (its unary Prune needs no models) and, behind it, a reward
service stand-in, so the pruner's own client to the reward service is exercised too.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epgrpo.protos import codec
from epgrpo.protos.channel import PRUNER_SERVICE, ChannelSecurity, create_channel
from epgrpo.protos.v1 import pruner_pb2, pruner_pb2_grpc, reward_pb2, reward_pb2_grpc, tensor_pb2
from epgrpo.services.common.auth import InsecureBind, ServerSecurity, TokenAuthInterceptor
from epgrpo.services.common.healthcheck import check
from epgrpo.services.common.server import ServerConfig
from epgrpo.services.pruner.main import build_registrar
from tests.certs import CertificateAuthority

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    ca, other = CertificateAuthority(out / "ca"), CertificateAuthority(out / "other", "other CA")
    return {"ca": ca, "server": ca.issue("server", ("127.0.0.1", "localhost")), "client": ca.issue("client", client=True),
            "rogue_client": other.issue("rogue", client=True), "other_ca": other}


def prune_request() -> pruner_pb2.PruneRequest:
    checkpoint = pruner_pb2.GroupCheckpoint(group_id="g", step=1, trajectory_ids=[0, 1, 2, 3],
                                            scores=pruner_pb2.ScoreList(values=[0.1, 0.5, 0.2, 0.9]))
    return pruner_pb2.PruneRequest(checkpoint=checkpoint, keep=2)


def start_pruner(background_server, security: ServerSecurity, reward_address="127.0.0.1:1", reward_security=None):
    """A pruner whose Prune handler counts the calls that reach it."""
    register = build_registrar(reward_address, 5.0, reward_security or ChannelSecurity())
    servicer, calls = register.servicer, []
    original = servicer.Prune

    async def counting(request, context):
        calls.append(request.checkpoint.group_id)
        return await original(request, context)

    servicer.Prune = counting
    server = background_server(register, ServerConfig(security=security))
    return server, calls


def call_prune(address, security=ChannelSecurity(), request=None):
    # No channel retries: a refused handshake is answered at once, not after 5 backed-off attempts.
    with create_channel(address, [PRUNER_SERVICE], security=security, retry=None) as channel:
        return pruner_pb2_grpc.PrunerServiceStub(channel).Prune(request or prune_request(), timeout=5)


def health_status(address, security=ChannelSecurity()):
    with create_channel(address, ["grpc.health.v1.Health"], security=security, retry=None) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def code_of(fn, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return info.value.code()


# -- bearer tokens ------------------------------------------------------------------------------
def test_token_right_wrong_missing_and_malformed(background_server):
    server, calls = start_pruner(background_server, ServerSecurity(tokens=(TOKEN,)))
    assert sorted(call_prune(server.address, ChannelSecurity(token=TOKEN)).survivor_ids) == [0, 3]
    assert calls == ["g"]
    for security in (ChannelSecurity(), ChannelSecurity(token="wrong"), ChannelSecurity(token=TOKEN + "x"),
                     ChannelSecurity(token=TOKEN[:-1])):
        assert code_of(call_prune, server.address, security) == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(server.address) as channel:  # not "Bearer <token>"
        stub = pruner_pb2_grpc.PrunerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Prune(prune_request(), timeout=5, metadata=[("authorization", f"Basic {TOKEN}")])
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and TOKEN not in info.value.details()
    assert calls == ["g"]  # no rejected call reached the servicer
    # The health check is exempt (probes have no token); the streaming RPC is not.
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.address) as channel:
        responses = pruner_pb2_grpc.PrunerServiceStub(channel).PruneRollout(iter([]), timeout=5)
        assert code_of(lambda: list(responses)) == grpc.StatusCode.UNAUTHENTICATED
    rejected = server.running.metrics.registry.get_sample_value(
        "epgrpo_grpc_requests_total", {"service": PRUNER_SERVICE, "method": "Prune", "code": "UNAUTHENTICATED"})
    assert rejected == 5


def test_token_file_accepts_every_listed_token_for_rotation(tmp_path, monkeypatch):
    from epgrpo.services.common import auth
    from epgrpo.services.common.auth import load_tokens

    path = tmp_path / "tokens"
    path.write_text("old-token\n\nnew-token\n")
    interceptor = TokenAuthInterceptor(load_tokens(path))
    compared, real = [], auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append((len(a), len(b))) or real(a, b))
    assert interceptor.problem([("authorization", "Bearer old-token")]) is None
    assert compared == [(32, 32), (32, 32)]  # constant time: every token compared, as equal-length digests
    assert interceptor.problem([("authorization", "Bearer new-token")]) is None
    assert interceptor.problem([("authorization", "Bearer newtoken")]) == "invalid bearer token"
    assert "missing" in interceptor.problem([])
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="contains no token"):
        load_tokens(tmp_path / "empty")


# -- TLS and mutual TLS -------------------------------------------------------------------------
def test_tls_serves_clients_that_trust_the_ca_only(background_server, pki):
    server, calls = start_pruner(background_server, ServerSecurity(str(pki["server"].cert), str(pki["server"].key)))
    trusted = ChannelSecurity(tls_ca=str(pki["ca"].pem))
    assert len(call_prune(server.address, trusted).survivor_ids) == 2
    assert code_of(call_prune, server.address) == grpc.StatusCode.UNAVAILABLE  # plaintext client
    untrusted = ChannelSecurity(tls_ca=str(pki["other_ca"].pem))
    assert code_of(call_prune, server.address, untrusted) == grpc.StatusCode.UNAVAILABLE
    assert calls == ["g"]
    assert check(server.address, security=trusted) and not check(server.address)


def test_mutual_tls_refuses_clients_without_a_certificate_at_the_handshake(background_server, pki):
    security = ServerSecurity(str(pki["server"].cert), str(pki["server"].key), tls_client_ca=str(pki["ca"].pem),
                              tokens=(TOKEN,))
    server, calls = start_pruner(background_server, security)
    ca = str(pki["ca"].pem)
    no_cert = ChannelSecurity(tls_ca=ca, token=TOKEN)
    rogue = ChannelSecurity(tls_ca=ca, tls_cert=str(pki["rogue_client"].cert), tls_key=str(pki["rogue_client"].key),
                            token=TOKEN)
    for security in (no_cert, rogue):
        assert code_of(call_prune, server.address, security) == grpc.StatusCode.UNAVAILABLE
        assert code_of(health_status, server.address, security) == grpc.StatusCode.UNAVAILABLE
    # Nothing was served: no RPC of any method got as far as the server's interceptors.
    assert calls == []
    assert not [s for m in server.running.metrics.registry.collect() if m.name == "epgrpo_grpc_requests" for s in m.samples]
    client = ChannelSecurity(tls_ca=ca, tls_cert=str(pki["client"].cert), tls_key=str(pki["client"].key))
    assert code_of(call_prune, server.address, client) == grpc.StatusCode.UNAUTHENTICATED  # cert, no token
    assert sorted(call_prune(server.address, ChannelSecurity(**{**client.__dict__, "token": TOKEN})).survivor_ids) == [0, 3]
    assert calls == ["g"]


class ConstantReward(reward_pb2_grpc.RewardServiceServicer):
    async def Score(self, request, context):
        return reward_pb2.ScoreResponse(scores=[float(i) for i in range(request.images.shape[0])])


def test_pruner_reaches_a_reward_service_under_mutual_tls_and_token(background_server, pki):
    def register(server):
        reward_pb2_grpc.add_RewardServiceServicer_to_server(ConstantReward(), server)
        return ["epgrpo.v1.RewardService"]

    reward = background_server(register, ServerConfig(security=ServerSecurity(
        str(pki["server"].cert), str(pki["server"].key), str(pki["ca"].pem), tokens=("reward-token",))))
    client = dict(tls_ca=str(pki["ca"].pem), tls_cert=str(pki["client"].cert), tls_key=str(pki["client"].key))
    previews = codec.encode(np.zeros((4, 1, 4, 4), np.float32))
    checkpoint = pruner_pb2.GroupCheckpoint(group_id="g", step=1, trajectory_ids=[0, 1, 2, 3], previews=previews,
                                            prompts=["p"])
    request = pruner_pb2.PruneRequest(checkpoint=checkpoint, keep=2,
                                      proxy_rewards=[tensor_pb2.RewardSpec(name="constant", weight=1.0)])
    good, _ = start_pruner(background_server, ServerSecurity(), reward.address,
                           ChannelSecurity(**client, token="reward-token"))
    decision = call_prune(good.address, request=request)
    assert list(decision.proxy_scores) == [0, 1, 2, 3] and sorted(decision.survivor_ids) == [0, 3]
    no_token, _ = start_pruner(background_server, ServerSecurity(), reward.address, ChannelSecurity(**client))
    with pytest.raises(grpc.RpcError) as info:
        call_prune(no_token.address, request=request)
    assert "UNAUTHENTICATED" in info.value.details()


# -- where a service may listen -----------------------------------------------------------------
@pytest.mark.parametrize("security, allowed", [
    (ServerSecurity(), False), (ServerSecurity(tokens=("t",)), True), (ServerSecurity(tls_cert="c", tls_key="k"), True),
    (ServerSecurity(allow_insecure_remote=True), True),
])
def test_non_loopback_hosts_need_tls_a_token_or_an_explicit_opt_in(security, allowed):
    for host in ("127.0.0.1", "127.0.0.5", "localhost", "::1"):
        security.check_bind(host)
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        if allowed:
            security.check_bind(host)
        else:
            with pytest.raises(InsecureBind, match="refusing to listen beyond this machine"):
                security.check_bind(host)


def test_start_server_refuses_0000_without_tls_or_token(background_server):
    with pytest.raises(InsecureBind, match="--allow-insecure-remote"):
        background_server(lambda s: [], ServerConfig(host="0.0.0.0"))


def test_service_cli_refuses_0000_with_a_clear_message(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "EPGRPO_TOKEN": ""}
    proc = subprocess.run([sys.executable, "-m", "epgrpo.services.pruner.main", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "--host 0.0.0.0: refusing to listen beyond this machine without TLS or a token" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "epgrpo.services.pruner.main", "--tls-cert", str(tmp_path / "none"),
                           "--tls-key", str(tmp_path / "none")], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "--tls-key: cannot read" in proc.stderr, proc.stderr
