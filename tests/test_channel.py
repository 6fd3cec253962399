"""Client channels: target forms, the service config, round robin over replicas behind one DNS name."""

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epgrpo.protos.channel import RetryPolicy, create_channel, is_loopback_target, service_config, target_for
from epgrpo.services.common.server import ServerConfig
from tests.dns_stub import DnsStub

HEALTH = "grpc.health.v1.Health"


@pytest.mark.parametrize("address, target", [
    ("127.0.0.1:50051", "127.0.0.1:50051"),
    ("reward:50051", "reward:50051"),
    ("10.0.0.1:1, 10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2"),
    ("[::1]:1,[::2]:2", "ipv6:[::1]:1,[::2]:2"),
    ("dns:///reward:50051", "dns:///reward:50051"),
    ("dns://10.0.0.53:53/reward:50051", "dns://10.0.0.53:53/reward:50051"),
    ("ipv4:127.0.0.1:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),
])
def test_target_forms(address, target):
    assert target_for(address) == (target, True)


@pytest.mark.parametrize("address, message", [
    ("", "at least one"), ("reward", "expected host:port"), ("a:1,b:2", "one DNS name resolving to all"),
    ("host:port", "expected host:port"),
])
def test_bad_addresses_are_named(address, message):
    with pytest.raises(ValueError, match=message):
        target_for(address)


def test_loopback_targets():
    assert is_loopback_target("127.0.0.1:1") and is_loopback_target("ipv4:127.0.0.2:1,127.0.0.3:1")
    assert is_loopback_target("localhost:5") and is_loopback_target("[::1]:5")
    assert not is_loopback_target("dns:///reward:1") and not is_loopback_target("10.1.2.3:4")


def test_service_config_retries_unavailable_with_bounded_backoff_and_throttling():
    config = json.loads(service_config(["a.B"], RetryPolicy(max_attempts=9, max_backoff_s=2.0), round_robin=True))
    policy = config["methodConfig"][0]["retryPolicy"]
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert policy["maxAttempts"] == 5 and policy["maxBackoff"] == "2.000s"
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert config["retryThrottling"]["maxTokens"] > 0
    assert "methodConfig" not in json.loads(service_config(["a.B"], None))


def _requests(server) -> float:
    return server.running.metrics.registry.get_sample_value(
        "epgrpo_grpc_requests_total", {"service": HEALTH, "method": "Check", "code": "OK"}) or 0.0


def _replicas(background_server, hosts):
    """Servers on the same port at different loopback addresses (like containers behind a name)."""
    for _ in range(5):
        first = background_server(lambda s: [], ServerConfig(host=hosts[0]))
        try:
            return [first] + [background_server(lambda s: [], ServerConfig(host=h, port=first.port)) for h in hosts[1:]]
        except OSError:  # the port is taken on another address: try another one
            continue
    pytest.skip("no port free on every loopback address")


def test_dns_name_round_robins_over_all_replicas_and_routes_around_a_dead_one(background_server):
    a, b = _replicas(background_server, ["127.0.0.2", "127.0.0.3"])
    dns = DnsStub({"reward.test": ["127.0.0.2", "127.0.0.3"]})
    channel = create_channel(dns.target("reward.test", a.port), [HEALTH])
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        check = lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5)  # noqa: E731
        check()  # connect
        grpc.channel_ready_future(channel).result(timeout=5)
        for _ in range(20):
            check()
        assert "reward.test" in dns.queries
        assert _requests(a) >= 5 and _requests(b) >= 5, (_requests(a), _requests(b))
        b.stop(grace_s=0)
        before = _requests(a)
        for _ in range(10):  # every call succeeds: round robin skips the dead replica
            assert check().status == health_pb2.HealthCheckResponse.SERVING
        assert _requests(a) == before + 10
    finally:
        channel.close()
        dns.close()
