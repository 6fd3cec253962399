"""Nothing that crosses a process boundary is pickled; size limits are explicit on both ends."""

import ast
import importlib
import re
from pathlib import Path

from epgrpo.protos.channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("protos", "services", "trainer", "bench") for p in (ROOT / d).rglob("*.py") if "_pb2" not in p.name]
# pickle itself, torch's pickle-based (de)serialisers, numpy's object-array loading, and sockets/HTTP
# bodies built from pickle would all show up as one of these.
# torch.load is allowed only with weights_only=True (tensors only, no code runs: reward checkpoints
# published as .pt files, read from local disk).
PICKLE = re.compile(r"\bimport pickle\b|\bfrom pickle\b|\bcloudpickle\b|\bdill\b|torch\.save\(|"
                    r"torch\.load\((?!.*weights_only=True)|"
                    r"allow_pickle\s*=\s*True|\bjoblib\b|\bmarshal\.")


def test_the_pickle_check_flags_what_it_must():
    assert PICKLE.search('torch.load(path)') and PICKLE.search('torch.load(p, weights_only=False)')
    assert not PICKLE.search('torch.load(str(path), map_location="cpu", weights_only=True)')
    assert PICKLE.search("import pickle") and PICKLE.search("np.load(f, allow_pickle=True)")


def test_no_pickle_anywhere_in_the_code():
    offenders = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in SOURCES
                 for i, line in enumerate(p.read_text().splitlines(), 1) if PICKLE.search(line)]
    assert offenders == []


def test_client_channels_set_both_message_limits():
    options = dict(channel_options(["epgrpo.v1.RewardService"]))
    assert options["grpc.max_send_message_length"] == DEFAULT_MAX_MESSAGE_BYTES
    assert options["grpc.max_receive_message_length"] == DEFAULT_MAX_MESSAGE_BYTES


# Every RPC of the services we call: ours, the OIP front, grpc health.
RPC_NAMES = frozenset(
    method.name
    for module in ("epgrpo.protos.v1.reward_pb2", "epgrpo.protos.v1.pruner_pb2", "epgrpo.protos.v1.oip_pb2",
                   "grpc_health.v1.health_pb2")
    for service in importlib.import_module(module).DESCRIPTOR.services_by_name.values()
    for method in service.methods
)
CLIENT_CODE = [ROOT / "services" / "pruner" / "proxy.py", *(p for p in SOURCES if p.parts[len(ROOT.parts)] in
                                                              ("trainer", "bench"))]


def stub_calls(source: str) -> list[tuple[int, str, bool]]:
    """(line, call, has timeout=) of every stub call: ``<x>.<Rpc>(...)`` for an RPC name, and
    ``getattr(<...stub...>, name)(...)``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        dynamic = (isinstance(func, ast.Call) and isinstance(func.func, ast.Name) and func.func.id == "getattr"
                   and "stub" in ast.unparse(func.args[0]).lower())
        if dynamic or (isinstance(func, ast.Attribute) and func.attr in RPC_NAMES):
            found.append((node.lineno, ast.unparse(func), any(k.arg == "timeout" for k in node.keywords)))
    return found


def test_the_deadline_check_sees_every_form_of_stub_call():
    calls = stub_calls("stub.Score(r)\nself.stub.ModelInfer(r, timeout=1)\ngetattr(self.stub, m)(r)\n"
                       "self._get_stub().Check(r, timeout=2)\nother.compute(r)\n")
    assert calls == [(1, "stub.Score", False), (2, "self.stub.ModelInfer", True), (3, "getattr(self.stub, m)", False),
                     (4, "self._get_stub().Check", True)]


def test_every_client_call_has_a_deadline():
    """Every stub call in the trainer, the benchmarks and the pruner's reward client passes timeout=."""
    seen, missing = set(), []
    for path in CLIENT_CODE:
        for line, call, has_timeout in stub_calls(path.read_text()):
            seen.add(path.relative_to(ROOT).as_posix())
            if not has_timeout:
                missing.append(f"{path.relative_to(ROOT)}:{line}: {call}(...)")
    assert missing == []
    # The check looked where the calls are (a scanner that finds nothing passes vacuously).
    assert {"trainer/clients.py", "trainer/reward_client.py", "trainer/oip_reward.py", "trainer/launch.py",
            "services/pruner/proxy.py"} <= seen
