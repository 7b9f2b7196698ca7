"""Training throughput, end to end: graph cache on disk -> packed arrays -> mini-batch graphs -> step.

For each preset (benchmark, no_edgenet, complete) at batch 512 this measures training structures/s of
the real training loop (``Trainer`` epoch: shuffle, batch graph construction, GraphIndex, forward,
masked four-target loss, backward, Adam step, metric bookkeeping) on the dev corpus graphs
(../shared/reference/coordinator_dev.json, reference neighbour lists), the peak RSS of the process, and
the projected time of one epoch on 450k structures (OQMD train split). Each preset runs in its own
process so peak RSS is its own. On a machine with CUDA the same is repeated with ``--device cuda``
(graph on CPU, index tensors on the GPU).

    python bench/train.py [--presets benchmark,no_edgenet,complete] [--epochs 3] [--devices cpu,cuda]

Reference: the original CGNN's training step alone (no data loading) on the 2-core development
machine runs at about 5,300 / 4,800 / 2,100 structures/s; the target is 1.2x that end to end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEV_JSON = REPO.parent / "shared" / "reference" / "coordinator_dev.json"
REFERENCE_STEP_RATE = {"benchmark": 5300.0, "no_edgenet": 4800.0, "complete": 2100.0}
TARGET_RATE = {k: 1.2 * v for k, v in REFERENCE_STEP_RATE.items()}
OQMD_TRAIN = 450_000


def build_cache(out: Path, dev_json: Path = DEV_JSON) -> int:
    """A real on-disk cache of the dev corpus (reference neighbour lists, synthetic 4-target labels)."""
    from cgnn_dgl.cache import Built, CacheWriter, ShardStream
    from cgnn_dgl.model.species import SPECIES_Z

    ok = set(SPECIES_Z)
    rows = [r for r in json.loads(Path(dev_json).read_text())
            if r.get("error") is None and r.get("neighbors") and all(z in ok for z in r["numbers"])]
    rng = np.random.default_rng(0)
    writer = CacheWriter(out, source={"kind": "bench", "file": str(dev_json)},
                         params={"radius_factor": 1.2, "cc_cutoff": 0.03, "max_rounds": 10})
    stream = ShardStream(writer)
    for key, r in enumerate(rows):
        numbers = np.asarray(r["numbers"], np.int64)
        counts = np.array([len(n) for n in r["neighbors"]], np.int64)
        nbr = np.array([i for n in r["neighbors"] for i in n], np.int64)
        vol = abs(np.linalg.det(np.asarray(r["lattice"]))) / len(numbers)
        y = np.array([np.mean(np.sin(numbers / 7.0)), vol, rng.random(), rng.random() * 0.1])
        stream.add(Built(key, r["name"], numbers, counts, nbr, y, np.ones(4, bool)))
    stream.flush()
    writer.close()
    return len(rows)


def run_one(preset: str, cache: Path, device: str, epochs: int, batch_size: int, backend: str) -> dict:
    """Measure in this process; prints one JSON line."""
    import torch

    from cgnn_dgl.cache import load_packed
    from cgnn_dgl.config import RunConfig
    from cgnn_dgl.report import peak_rss_mb
    from cgnn_dgl.train import Trainer

    t0 = time.perf_counter()
    packed = load_packed(cache)
    load_s = time.perf_counter() - t0
    n = len(packed)
    cfg = RunConfig.from_dict({"model": {"preset": preset},
                               "train": {"batch_size": batch_size, "device": device, "progress": False,
                                         "epochs": epochs + 1, "backend": backend}})
    with tempfile.TemporaryDirectory() as tmp:
        split = {"train": np.arange(n), "val": np.zeros(0, np.int64), "test": np.zeros(0, np.int64)}
        tr = Trainer(cfg, Path(tmp), packed, split)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        tr._pass(split["train"], True, "warm-up")  # first epoch: allocator, DGL format caches
        sync()
        times = []
        for _ in range(epochs):
            t = time.perf_counter()
            tr._pass(split["train"], True, "bench")
            sync()
            times.append(time.perf_counter() - t)
    best = min(times)
    out = {
        "preset": preset, "device": device, "n": n, "batch_size": batch_size, "threads": torch.get_num_threads(),
        "params": tr.model.n_parameters(), "epoch_s": times, "rate": n / best, "median_rate": n / float(np.median(times)),
        "cache_load_s": load_s, "peak_rss_mb": peak_rss_mb(),
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    }
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="benchmark,no_edgenet,complete")
    ap.add_argument("--devices", default=None, help="cpu,cuda (default: cpu, plus cuda when available)")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs over the corpus (after one warm-up)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--cache", default=None, help="reuse / build the cache here (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        run_one(args.one, Path(args.cache), args.device, args.epochs, args.batch_size, args.backend)
        return 0

    import torch

    from cgnn_dgl.report import print_table

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    tmp = None
    if args.cache is None:
        tmp = tempfile.TemporaryDirectory()
        cache = Path(tmp.name) / "cache"
    else:
        cache = Path(args.cache)
    if not (cache / "manifest.json").is_file():
        t = time.perf_counter()
        n = build_cache(cache)
        print(f"cache of {n} dev-corpus graphs built in {time.perf_counter() - t:.1f}s at {cache}")
    results = []
    for device in devices:
        for preset in args.presets.split(","):
            cmd = [sys.executable, __file__, "--one", preset, "--device", device, "--cache", str(cache),
                   "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--backend", args.backend]
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
            if r.returncode != 0 or not lines:
                print(f"{preset} on {device} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
                continue
            res = json.loads(lines[-1])
            results.append(res)
            print(f"{device} {preset}: {res['rate']:,.0f} structures/s (epochs {', '.join(f'{s:.2f}s' for s in res['epoch_s'])})",
                  flush=True)
    rows = []
    for r in results:
        ref = REFERENCE_STEP_RATE[r["preset"]]
        rows.append((r["device"], r["preset"], r["params"], r["rate"], r["median_rate"], ref, TARGET_RATE[r["preset"]],
                     f"{r['rate'] / ref:.2f}x", OQMD_TRAIN / r["rate"], r["peak_rss_mb"]))
    print_table(f"training throughput end to end (cache -> batches -> step), batch {args.batch_size}, "
                f"{results[0]['n'] if results else 0} dev-corpus structures, {args.epochs} timed epochs",
                rows, header=["device", "preset", "params", "best struct/s", "median struct/s", "reference step",
                              "target", "ratio", "epoch 450k (s)", "peak RSS (MiB)"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
