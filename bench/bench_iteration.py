"""One training iteration against its model-compute floor, and beside a busy neighbour.

For a pipeline (--config) and a mode (plain GRPO, Expand-and-Prune), measured in one run:
  floor      the transformer calls the iteration must make, timed alone at the batch shapes the
             iteration used: the sampling forwards (every NFE), the reference forwards the KL
             needs, the training forward + backward of every trained step. Nothing else.
  iteration  the real trainer iteration (trainer.loop.Trainer.iteration) with the reward and
             pruner services in this process (gRPC on loopback) and launched as processes (what
             `epgrpo train` does), broken down into sampling, pruning decisions, decoding, reward,
             old-log-prob recomputation, reference forwards, update, checkpoint.
Every transformer call the iteration makes is recorded (phase, input shapes) by a hook and the
floor replays those shapes, so floor and iteration see identical work. Variants alternate
iteration by iteration; medians are reported (shared machines are noisy).

--contention runs the iteration (launched services) in child processes, each quiet and beside one
busy process (a torch matmul loop), with libgomp sleeping when idle (OMP_WAIT_POLICY=PASSIVE, the
default since protos/cpu_threads.py) and spinning as it did before (GOMP_SPINCOUNT=300000, libgomp's
own default); target: busy <= 1.5x quiet, and passive alone no slower than spinning alone.

    python bench/bench_iteration.py                          # small SD3 (width 384, 6 layers, 64 px)
    python bench/bench_iteration.py --config tiny-sd3 --mode ep
    python bench/bench_iteration.py --config tiny-sd3 --contention
    python bench/bench_iteration.py --quick                  # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tiny pipeline builders

import torch  # noqa: E402

import epgrpo.trainer.loop as loop_module  # noqa: E402
from epgrpo.trainer.clients import PrunerClient, PrunerStream  # noqa: E402
from epgrpo.trainer.config import load_config  # noqa: E402
from epgrpo.trainer.launch import LocalStack  # noqa: E402
from epgrpo.trainer.loop import Trainer  # noqa: E402
from epgrpo.trainer.policy import toy  # noqa: E402,F401 - registers the toy adapter
from epgrpo.trainer.policy.base import create_policy  # noqa: E402
from epgrpo.trainer.reward_client import RewardClient  # noqa: E402

# name: (pipeline builder options or None for the toy, sampling steps, prompts, G for grpo, E&P schedule)
CONFIGS = {
    "toy": (None, 10, 2, 8),
    "tiny-sd3": (dict(), 10, 2, 8),
    "small-sd3": (dict(image_size=64, num_layers=6, num_heads=6, head_dim=64), 10, 2, 8),
}
QUICK = {"steps": 4, "prompts": 1, "group": 4, "iterations": 1}
NEIGHBOUR = ("import torch\ntorch.set_num_threads({threads})\na = torch.randn(384, 384)\n"
             "while True:\n    a = torch.tanh(a @ a)\n")


def pipeline(name: str, cache: Path) -> Path | None:
    options = CONFIGS[name][0]
    if options is None:
        return None
    directory = cache / name
    if not (directory / "model_index.json").exists():
        from tiny_sd3 import build_tiny_sd3

        build_tiny_sd3(directory, **options)
    return directory


def make_config(name: str, mode: str, path: Path | None, out: Path, steps: int, prompts: int, group: int):
    """Flow-GRPO-like settings: every step but the last trained, LoRA, CFG 4.5, KL beta 0.04."""
    schedule = (["prune.mode=grpo", f"prune.group_size={group}"] if mode == "grpo" else
                ["prune.mode=expand_prune", f"prune.group_size={2 * group}", f"prune.steps=[{max(1, steps // 4)}]",
                 f"prune.keeps=[{group}]"])
    model = (["model.name=sd3", f"model.path={path}", "model.lora_rank=4", "model.max_sequence_length=8",
              "model.preview_decoder=vae", "sampling.guidance_scale=4.5", "sampling.shift=3.0"] if path else
             ["model.pretrain_steps=3"])
    return load_config(None, [
        *model, "model.device=cpu", f"sampling.num_steps={steps}", *schedule,
        f"train.prompts_per_iteration={prompts}", "train.iterations=1000", "train.lr=1e-4",
        "reward.rewards=jpeg_compressibility:1", "reward.judge=", "eval.every=0", f"out_dir={out}",
        "launch_services=false", "progress=false"])


class BackgroundServer:
    """A service in this process: ``start_server`` on an event loop in a daemon thread."""

    def __init__(self, register):
        from epgrpo.services.common.server import ServerConfig, start_server

        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        self.running = self._call(start_server(register, ServerConfig()))
        self.address = f"127.0.0.1:{self.running.port}"

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    def stop(self):
        self._call(self.running.stop(0.2))
        self._loop.call_soon_threadsafe(self._loop.stop)


@contextlib.contextmanager
def services(kind: str, path: Path | None, log_dir: Path):
    """(reward address, pruner address): in this process, or launched as `epgrpo train` does."""
    decoders = {"vae": str(path)} if path else None
    if kind == "launched":
        with LocalStack(["jpeg_compressibility"], log_dir, decoders=decoders) as stack:
            yield stack.reward.address, stack.pruner.address
        return
    from epgrpo.services.pruner.decode import register_vae_decoder
    from epgrpo.services.pruner.main import build_registrar as pruner_registrar
    from epgrpo.services.reward.main import build_registrar as reward_registrar

    if path:
        register_vae_decoder("vae", path)
    reward = BackgroundServer(reward_registrar(["jpeg_compressibility"]))
    pruner = BackgroundServer(pruner_registrar(reward.address))
    try:
        yield reward.address, pruner.address
    finally:
        pruner.stop()
        reward.stop()


class Probe:
    """Records every transformer call (phase, shapes, seconds) and times the iteration's parts."""

    def __init__(self, policy):
        self.policy = policy
        self.phase = "sampling"
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[tuple, int] = defaultdict(int)
        self.inputs: dict[tuple, dict] = {}
        self.modules: dict[tuple, torch.nn.Module] = {}
        self._starts: dict[int, float] = {}
        # full fine-tuning keeps the reference as a frozen copy (LoRA: the same module, adapters off)
        reference_copy = getattr(policy, "_reference_transformer", None)
        self.reference_copy = reference_copy if reference_copy is not policy.transformer else None
        self._hooks = []
        self.attach()
        self._patches: list[tuple[object, str, object]] = []
        self.patch(policy, "decode", "decode")
        self.patch(PrunerStream, "decide", "pruning decisions")
        original_update = loop_module.Trainer.update_policy  # the algorithm's update of the kept trajectories

        def update(trainer, *args, **kwargs):
            self.phase = "update"
            try:
                return self.timed("update", original_update, trainer, *args, **kwargs)
            finally:
                self.phase = "sampling"
        self._patches.append((loop_module.Trainer, "update_policy", original_update))
        loop_module.Trainer.update_policy = update
        original_reference = policy.reference

        @contextlib.contextmanager
        def reference():
            previous, self.phase = self.phase, "reference"
            try:
                with original_reference():
                    yield
            finally:
                self.phase = previous
        self._patches.append((policy, "reference", None))
        policy.reference = reference

    def patch(self, owner, attribute: str, label: str) -> None:
        original = getattr(owner, attribute)
        probe = self

        def wrapper(*args, **kwargs):
            return probe.timed(label, original, *args, **kwargs)
        self._patches.append((owner, attribute, original if isinstance(owner, type) else None))
        setattr(owner, attribute, wrapper)

    def timed(self, label, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[label] += time.perf_counter() - start

    def attach(self) -> None:
        for module in filter(None, (self.policy.transformer, self.reference_copy)):
            self._hooks += [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                            module.register_forward_hook(self._post, with_kwargs=True)]

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _phase(self, module=None) -> str:
        if module is not None and module is self.reference_copy:
            return "reference"
        if self.phase == "update" and not torch.is_grad_enabled():
            return "old log-probs"
        return {"update": "train forward"}.get(self.phase, self.phase)

    def _pre(self, module, args, kwargs):
        phase = self._phase(module)
        key = (phase, *(tuple(v.shape) for v in kwargs.values() if torch.is_tensor(v)))
        self.calls[key] += 1
        if key not in self.inputs:
            self.inputs[key] = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            self.modules[key] = module
        self._starts[threading.get_ident()] = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        elapsed = time.perf_counter() - self._starts.pop(threading.get_ident())
        self.seconds[f"transformer: {self._phase(module)}"] += elapsed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def close(self) -> None:
        self.detach()
        for owner, attribute, original in reversed(self._patches):
            if original is None:
                delattr(owner, attribute)  # an instance attribute shadowing the class's method
            else:
                setattr(owner, attribute, original)


def floor_seconds(policy, probe: Probe, repeats: int) -> dict[str, float]:
    """The recorded calls of the must-do phases, replayed alone at the same shapes (median of repeats)."""
    floor: dict[str, float] = defaultdict(float)
    probe.detach()
    try:
        for key, count in probe.calls.items():
            phase, inputs, transformer = key[0], probe.inputs[key], probe.modules[key]
            if phase == "old log-probs":
                continue  # the rollout had them: not part of the floor

            policy.train(phase != "sampling")  # the rollout samples in eval mode, the update runs in train mode

            def call():
                if phase == "train forward":
                    out = transformer(**inputs)
                    (out[0] if isinstance(out, tuple) else out.sample).float().sum().backward()
                    return
                context = policy.reference() if phase == "reference" else contextlib.nullcontext()
                with torch.no_grad(), context:
                    transformer(**inputs)
            call()  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            floor["train forward+backward" if phase == "train forward" else phase] += statistics.median(times) * count
        for p in policy.transformer.parameters():
            p.grad = None
    finally:
        probe.attach()
    return dict(floor)


def measure(args) -> dict:
    cache = Path(args.cache or tempfile.mkdtemp(prefix="epgrpo-bench-iteration-"))
    path = pipeline(args.config, cache)
    steps, prompts, group = args.steps, args.prompts, args.group
    modes = ["grpo", "ep"] if args.mode == "both" else [args.mode]
    kinds = args.services.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        addresses = {kind: stack.enter_context(services(kind, path, tmp / kind)) for kind in kinds}
        config = make_config(args.config, modes[0], path, tmp / "run", steps, prompts, group)
        options = {k: v for k, v in vars(config.model).items() if k not in ("name", "device", "dtype", "preview_vae")
                   and v != getattr(type(config.model)(), k)}
        policy = create_policy(config.model.name, **options, device="cpu",
                               guidance_scale=config.sampling.guidance_scale, progress=False)
        probe = Probe(policy)
        stack.callback(probe.close)
        for mode in modes:
            trainers = {}
            for kind in kinds:
                reward_address, pruner_address = addresses[kind]
                reward, pruner = RewardClient(reward_address), PrunerClient(pruner_address)
                stack.callback(reward.close)
                stack.callback(pruner.close)
                config = make_config(args.config, mode, path, tmp / f"run-{mode}-{kind}", steps, prompts, group)
                trainers[kind] = Trainer(config, policy, reward, pruner)
                trainers[kind].check_services()
            for kind, trainer in trainers.items():  # warm-up: first calls, allocations, connections
                trainer.iteration(1)
            samples: dict[str, list[float]] = defaultdict(list)
            parts: dict[str, dict[str, list[float]]] = {kind: defaultdict(list) for kind in kinds}
            for it in range(args.iterations):
                for kind, trainer in trainers.items():
                    probe.reset()
                    start = time.perf_counter()
                    record = trainer.iteration(it + 2)
                    samples[kind].append(time.perf_counter() - start)
                    for label, seconds in probe.seconds.items():
                        parts[kind][label].append(seconds)
                    parts[kind]["rollout (loop's rollout_s)"].append(record["rollout_s"])
                    trainer.completed_iteration = it + 2
            calls = dict(probe.calls)
            start = time.perf_counter()
            trainers[kinds[0]].checkpoint()
            checkpoint_s = time.perf_counter() - start
            floor = floor_seconds(policy, probe, args.repeats)
            results[mode] = {
                "iteration_s": {kind: statistics.median(v) for kind, v in samples.items()},
                "parts_s": {kind: {k: statistics.median(v) for k, v in p.items()} for kind, p in parts.items()},
                "floor_s": floor, "floor_total_s": sum(floor.values()), "checkpoint_s": checkpoint_s,
                "transformer_calls": {" ".join(map(str, k)): n for k, n in calls.items()},
            }
    return results


def report(results: dict, args) -> None:
    model = "LoRA rank 4, CFG 4.5" if CONFIGS[args.config][0] is not None else "full fine-tuning, no CFG"
    print(f"config {args.config}: {args.prompts} prompts x G={args.group}, {args.steps} steps, {model}, KL beta 0.04 "
          f"(medians of {args.iterations} iterations per variant, alternating)")
    for mode, r in results.items():
        floor = r["floor_total_s"]
        print(f"\n[{mode}] floor {floor:.3f} s = " + " + ".join(f"{k} {v:.3f}" for k, v in r["floor_s"].items()))
        for kind, seconds in r["iteration_s"].items():
            print(f"  iteration ({kind} services): {seconds:.3f} s = {seconds / floor:.2f}x floor")
            parts = r["parts_s"][kind]
            update = parts.get("update", 0.0)
            transformer = {k: v for k, v in parts.items() if k.startswith("transformer: ")}
            sampling_t = transformer.get("transformer: sampling", 0.0)
            rollout = parts.get("rollout (loop's rollout_s)", 0.0)
            rows = [
                ("sampling: transformer", sampling_t),
                ("sampling: the rest (steps, log-probs, previews)",
                 rollout - sampling_t - parts.get("pruning decisions", 0) - parts.get("decode", 0)),
                ("pruning decisions (pruner round trips)", parts.get("pruning decisions", 0.0)),
                ("decoding final latents", parts.get("decode", 0.0)),
                ("reward (after the rollout)", seconds - rollout - update),
                ("update: train forward", transformer.get("transformer: train forward", 0.0)),
                ("update: reference forwards (KL)", transformer.get("transformer: reference", 0.0)),
                ("update: old log-prob recomputation", transformer.get("transformer: old log-probs", 0.0)),
                ("update: backward, loss, optimizer",
                 update - sum(v for k, v in transformer.items() if k != "transformer: sampling")),
            ]
            for label, value in rows:
                print(f"    {label:<50} {value:8.3f} s")
        if len(r["iteration_s"]) == 2:
            a, b = (r["iteration_s"][k] for k in ("inprocess", "launched"))
            print(f"  launched / in-process: {b / a:.3f}")
        print(f"  checkpoint (once, not per iteration unless train.checkpoint_every=1): {r['checkpoint_s']:.3f} s")


def contention(args) -> dict:
    """Child processes: {passive, spinning} x {quiet, beside a busy neighbour}, interleaved."""
    cache = args.cache or tempfile.mkdtemp(prefix="epgrpo-bench-iteration-")
    pipeline(args.config, Path(cache))
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    policies = {"passive (default)": {}, "spinning (before)": {"GOMP_SPINCOUNT": "300000"}}
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    for rep in range(args.contention_repeats):
        for name, extra in policies.items():
            for busy in (False, True):
                neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR.format(threads=args.neighbour_threads)],
                                             env=base) if busy else None
                try:
                    with tempfile.NamedTemporaryFile(suffix=".json") as out:
                        subprocess.run([sys.executable, __file__, "--config", args.config, "--mode", args.mode,
                                        "--services", "launched", "--steps", str(args.steps), "--prompts",
                                        str(args.prompts), "--group", str(args.group), "--iterations",
                                        str(args.iterations), "--repeats", "1", "--cache", cache, "--json", out.name,
                                        "--no-report"], env={**base, **extra}, check=True, timeout=3600)
                        result = json.loads(Path(out.name).read_text())
                finally:
                    if neighbour is not None:
                        neighbour.kill()
                        neighbour.wait()
                seconds = next(iter(result.values()))["iteration_s"]["launched"]
                times[name, "busy" if busy else "quiet"].append(seconds)
                print(f"  rep {rep}: {name:<18} {'busy' if busy else 'quiet':<5} {seconds:.3f} s/iteration", flush=True)
    summary = {f"{name} {state}": statistics.median(v) for (name, state), v in times.items()}
    print("\ncontention (medians):")
    for name in policies:
        quiet, busy = summary[f"{name} quiet"], summary[f"{name} busy"]
        print(f"  {name:<18} quiet {quiet:.3f} s, busy {busy:.3f} s: busy / quiet = {busy / quiet:.2f}")
    passive, spinning = (summary[f"{n} quiet"] for n in policies)
    print(f"  alone: passive / spinning = {passive / spinning:.3f}")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                        help="pipeline (default small-sd3; --quick: tiny-sd3)")
    parser.add_argument("--mode", choices=["grpo", "ep", "both"], default=None,
                        help="plain GRPO with G, Expand-and-Prune 2G -> G, or both (default both; --quick: grpo)")
    parser.add_argument("--services", default=None,
                        help="where the reward and pruner services run, comma-separated: inprocess, launched "
                             "(default both; --quick: inprocess)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the config's)")
    parser.add_argument("--prompts", type=int, help="groups per iteration (default: the config's)")
    parser.add_argument("--group", type=int, help="G: trained trajectories per group (default: the config's)")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per variant (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per floor call shape (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a few seconds: tiny sizes (tests)")
    parser.add_argument("--contention", action="store_true",
                        help="iteration time quiet vs beside a busy process, libgomp passive vs spinning")
    parser.add_argument("--contention-repeats", type=int, default=2, help="rounds of the contention case")
    parser.add_argument("--neighbour-threads", type=int, default=1, help="torch threads of the busy neighbour")
    parser.add_argument("--cache", help="directory for the built pipelines (default: a new temporary one)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.config = args.config or ("tiny-sd3" if args.quick else "small-sd3")
    _, steps, prompts, group = CONFIGS[args.config]
    if args.quick:
        steps, prompts, group, args.iterations, args.repeats = (QUICK["steps"], QUICK["prompts"], QUICK["group"],
                                                               QUICK["iterations"], 1)
    args.steps, args.prompts, args.group = args.steps or steps, args.prompts or prompts, args.group or group
    args.mode = args.mode or ("grpo" if args.quick else "both")
    args.services = args.services or ("inprocess" if args.quick else "inprocess,launched")
    unknown = set(args.services.split(",")) - {"inprocess", "launched"}
    if unknown:
        parser.error(f"--services: expected inprocess and/or launched, got {args.services!r}")
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
          flush=True)
    results = contention(args) if args.contention else measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.contention and not args.no_report:
        report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
