"""log.wandb: short toy runs logged to W&B in offline mode, read back from the run's .wandb file."""

import json
import socket
import struct
import sys

import pytest

from epgrpo.trainer.cli import main
from epgrpo.trainer.clients import PrunerClient
from epgrpo.trainer.reward_client import RewardClient
from epgrpo.trainer.config import load_config
from epgrpo.trainer.loop import Trainer

OPTIONS = [
    "prune.group_size=4", "prune.steps=[2]", "prune.keeps=[2]", "sampling.num_steps=4",
    "train.prompts_per_iteration=2", "train.checkpoint_every=1", "reward.rewards=jpeg_compressibility:1",
    "reward.judge=digit_judge", "eval.samples_per_prompt=2", "eval.max_prompts=2", "eval.every=1",
    "launch_services=false", "progress=false", "log.wandb=true", "log.wandb_mode=offline",
]
BOOKKEEPING = {"iteration", "_step", "_runtime", "_timestamp"}


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B's directories in tmp_path; its server address a closed local port, so that any attempt to
    reach it would fail the run instead of leaving the machine."""
    pytest.importorskip("wandb")  # the dev extra installs it; the missing-package test runs without
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    connect = socket.socket.connect

    def local_only(sock, address):  # this process (wandb's Python side) reaches nothing off the machine
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"network connection to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    return tmp_path / "WANDB_DIR" / "wandb"


def train(services, policy, out, *overrides):
    reward, pruner = services
    config = load_config(None, [*OPTIONS, f"out_dir={out}", *overrides])
    reward_client, pruner_client = RewardClient(reward.address), PrunerClient(pruner.address)
    try:
        Trainer(config, policy, reward_client, pruner_client).run()
    finally:
        reward_client.close()
        pruner_client.close()
        # run.finish() returns before wandb's service process has flushed the .wandb file to disk
        # (seen under load); stopping the service, as the interpreter's exit does, completes it
        import wandb

        wandb.teardown()


def read_records(path):
    """The protobuf records of a .wandb file: wandb's LevelDB-style log (a 7-byte file header
    ':W&B', magic, version; 32 KiB blocks of chunks, each with a 7-byte header crc32, length, type
    1 full | 2 first | 3 middle | 4 last). wandb 0.2x no longer ships a Python reader for it."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), path
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_run(wandb_dir, index=0):
    """(run directory, records) of the index-th offline run (in start order)."""
    runs = sorted(wandb_dir.glob("offline-run-*"))
    (path,) = runs[index].glob("run-*.wandb")
    return runs[index], read_records(path)


def history(records):
    """One dict per logged row, values decoded from JSON; nested keys (images) joined with '/'."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def one(records, kind):
    (found,) = [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]
    return found


def tensorboard_scalars(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def test_offline_run_logs_what_tensorboard_gets_and_the_images_and_resume_continues_it(
        services, tiny_policy_factory, tmp_path, wandb_env):
    out = tmp_path / "run"
    train(services, tiny_policy_factory(lora_rank=4), out, "train.iterations=1")

    run_dir, records = offline_run(wandb_env)
    run_id = (out / "wandb_run_id").read_text()
    assert run_dir.name.endswith(f"-{run_id}") and (run_dir / f"run-{run_id}.wandb").is_file()
    run = one(records, "run")
    assert run.run_id == run_id and run.display_name == "run"  # default name: the out_dir's
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["iterations"] == 1 and config["log"]["wandb_mode"] == "offline"
    assert one(records, "exit").exit_code == 0
    assert "http" not in (run_dir / "logs" / "debug-internal.log").read_text()  # wandb-core contacted nothing

    rows = history(records)
    # every scalar TensorBoard got, under the same name and with the same value, at the same iteration
    logged = {(key, row["iteration"]): value for row in rows for key, value in row.items()
              if key not in BOOKKEEPING and not key.startswith(("eval/samples", "eval/reward_curve"))}
    tb = tensorboard_scalars(out)
    assert set(logged) == set(tb)
    assert {"metrics/reward_mean", "metrics/nfe_ratio", "metrics/pruning_ratio", "eval/reward",
            "eval/judge"} <= {key for key, _ in tb}
    for key, value in tb.items():
        assert logged[key] == pytest.approx(value, rel=1e-6), key
    # an evaluation before training and one after iteration 1: a sample grid and the reward curve each
    media = [row for row in rows if "eval/samples/path" in row]
    assert [row["iteration"] for row in media] == [0, 1]
    for row in media:
        for key in ("eval/samples", "eval/reward_curve"):
            assert row[f"{key}/_type"] == "image-file"
            image = run_dir / "files" / row[f"{key}/path"]
            assert image.is_file() and image.parent == run_dir / "files" / "media" / "images" / "eval"
            assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (row["eval/samples/width"], row["eval/samples/height"]) == (4 * (2 * 17 + 1), 4 * (2 * 17 + 1))
    assert all(row["iteration"] in (0, 1) for row in rows)

    # resume: the second W&B run directory is the same run, continuing at iteration 2
    train(services, tiny_policy_factory(lora_rank=4), out, "train.iterations=2", "train.resume_from=latest")
    resumed_dir, resumed = offline_run(wandb_env, 1)
    assert (out / "wandb_run_id").read_text() == run_id
    assert one(resumed, "run").run_id == run_id and (resumed_dir / f"run-{run_id}.wandb").is_file()
    rows = history(resumed)
    assert {row["iteration"] for row in rows} == {2}
    assert any("metrics/reward_mean" in row for row in rows) and any("eval/samples/path" in row for row in rows)

    # a fresh run in the same out_dir is a new W&B run, as its metrics.jsonl starts anew
    train(services, tiny_policy_factory(lora_rank=4), out, "train.iterations=1")
    assert (out / "wandb_run_id").read_text() != run_id


def test_a_failing_run_is_finished_and_marked_failed(services, tiny_policy_factory, tmp_path, wandb_env, monkeypatch):
    def broken(self, iteration):
        raise RuntimeError("iteration failed")

    monkeypatch.setattr(Trainer, "iteration", broken)
    with pytest.raises(RuntimeError, match="iteration failed"):
        train(services, tiny_policy_factory(lora_rank=4), tmp_path / "run", "train.iterations=1")
    _, records = offline_run(wandb_env)
    assert one(records, "exit").exit_code == 1
    assert [row["iteration"] for row in history(records) if "eval/reward" in row] == [0]  # what it had


def test_without_wandb_the_run_stops_before_any_work_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "run"
    assert main(["train", "log.wandb=true", f"out_dir={out}", "progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "epgrpo: error: log.wandb=true needs the wandb package: pip install epgrpo[wandb]"
    assert not out.exists()  # no services started, no model loaded, nothing written


def test_wandb_mode_is_checked_with_the_config(capsys):
    assert main(["config", "log.wandb_mode=cloud"]) == 2
    assert "log.wandb_mode: expected '' | online | offline, got 'cloud'" in capsys.readouterr().err
