"""Nothing that crosses a process boundary is pickled; size limits are explicit on both ends."""

import re
from pathlib import Path

from epgrpo.protos.channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("protos", "services", "trainer", "bench") for p in (ROOT / d).rglob("*.py") if "_pb2" not in p.name]
# pickle itself, torch's pickle-based (de)serialisers, numpy's object-array loading, and sockets/HTTP
# bodies built from pickle would all show up as one of these.
PICKLE = re.compile(r"\bimport pickle\b|\bfrom pickle\b|\bcloudpickle\b|\bdill\b|torch\.save\(|torch\.load\(|"
                    r"allow_pickle\s*=\s*True|\bjoblib\b|\bmarshal\.")


def test_no_pickle_anywhere_in_the_code():
    offenders = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in SOURCES
                 for i, line in enumerate(p.read_text().splitlines(), 1) if PICKLE.search(line)]
    assert offenders == []


def test_client_channels_set_both_message_limits():
    options = dict(channel_options(["epgrpo.v1.RewardService"]))
    assert options["grpc.max_send_message_length"] == DEFAULT_MAX_MESSAGE_BYTES
    assert options["grpc.max_receive_message_length"] == DEFAULT_MAX_MESSAGE_BYTES


def test_every_client_call_has_a_deadline():
    """Every stub call in the trainer and the pruner's reward client passes timeout=."""
    calls = re.compile(r"\.(Score|ListRewards|Prune|PruneRollout|ListDecoders|Check)\(")
    missing = []
    for path in [ROOT / "trainer" / "clients.py", ROOT / "services" / "pruner" / "proxy.py", ROOT / "trainer" / "launch.py"]:
        text = path.read_text()
        for match in calls.finditer(text):
            statement = text[match.start(): match.start() + 400].split("\n\n")[0]  # the call, up to a blank line
            if "timeout=" not in statement:
                missing.append(f"{path.name}: {text[match.start(): match.start() + 60]!r}")
    assert missing == []
