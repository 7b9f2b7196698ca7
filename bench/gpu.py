"""Device proof of the GPU path in one script: parity, throughput, memory, data-path overhead, DDP.

It runs in two places. In the project's venv (DGL present), ``--export`` cuts mini-batches out of a
real graph cache into plain ``.npz`` files (bond_src, bond_dst, atom_crystal, Z, y, y_mask [, bond_ratio]
plus meta.json), a few MiB. On the GPU machine, which needs only torch and numpy (no DGL, pymatgen,
SQLAlchemy or PyYAML), ``--batches`` does the rest with the project's own model and DGL-free data path
(cgnn_dgl.model, cgnn_dgl.step):

1. CPU-CUDA parity of the forward pass and of every parameter gradient on the same weights and batch,
   per preset, in float64 (max relative error <= 1e-9) and float32 (<= 1e-4); error = max |cuda - cpu|
   over a tensor divided by max |cpu| of that tensor, worst tensor reported;
2. training structures/s of each preset at batch 512 and 4096, float32 and bf16 autocast (Adam, masked
   MSE over every label column, batches fed by FlatLoader: assembled in a thread, pinned, copied
   non-blocking one batch ahead), with peak GPU memory (torch.cuda.max_memory_allocated);
3. the share of each step spent outside the GPU: 1 - t_resident / t_fed, where t_fed times steps fed by
   the loader and t_resident the same number of steps on batches already on the GPU; plus the share of
   wall time the loop waited for the loader;
4. the cost of ``train.deterministic`` (torch.use_deterministic_algorithms) on the benchmark preset;
5. a one-process ``torchrun`` DDP smoke run (nccl; gloo in the dry run).

It prints a table per part and writes everything, with units, to one JSON file. On one H200 it is sized
to finish in about 3 minutes (``--time-budget`` stops starting new parts after 330 s by default).

Commands (from the repository root)::

    # 1. here, in the project venv: batches from a real cache (default: the reference neighbour lists
    #    of ../shared/reference/coordinator_dev.json with synthetic labels; or --cache DIR)
    .venv/bin/python bench/gpu.py --export bench-gpu-batches
    # 2. on the GPU machine, torch and numpy only:
    PYTHONPATH=. python bench/gpu.py --batches bench-gpu-batches --out bench-gpu.json
    # the whole script on the CPU, small sizes, gloo DDP (CI runs this with DGL & co. hidden):
    PYTHONPATH=. python bench/gpu.py --batches bench-gpu-batches --cpu-dry-run --out dry.json

Goal on one H200 at batch 512: >= 100,000 structures/s (benchmark preset) and >= 40,000 (complete);
the reference CGNN managed 13,868 and 5,490 on a GTX 1080.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PRESETS = ("benchmark", "no_edgenet", "complete")
GOAL = {"benchmark": 100_000.0, "complete": 40_000.0}
REFERENCE_GTX1080 = {"benchmark": 13_868.0, "complete": 5_490.0}
TOL = {"float64": 1e-9, "float32": 1e-4}
EXPORT_LIMIT = 64 * 2**20


# --------------------------------------------------------------------------------------------------
# export (project venv)


def export(out: Path, cache: str | None, batch_size: int, max_crystals: int) -> dict:
    """Write ``batch_NNNN.npz`` + ``meta.json`` from a real cache (built from the dev corpus if none)."""
    from cgnn_dgl.cache import load_packed
    from cgnn_dgl.fileio import atomic_open, atomic_write_json
    from cgnn_dgl.step import assemble, index_batches

    source: dict
    with tempfile.TemporaryDirectory() as tmp:
        if cache is None:
            import importlib.util

            spec = importlib.util.spec_from_file_location("bench_train", REPO / "bench" / "train.py")
            bench_train = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(bench_train)
            cache_dir = Path(tmp) / "cache"
            bench_train.build_cache(cache_dir)
            source = {"kind": "cache built by bench/train.py build_cache", "structures": str(bench_train.DEV_JSON),
                      "graphs": "reference neighbour lists", "labels": "SYNTHETIC (throughput only)"}
        else:
            cache_dir = Path(cache)
            manifest = json.loads((cache_dir / "manifest.json").read_text())
            source = {"kind": "graph cache", "path": str(cache_dir.resolve()), "cache_source": manifest.get("source"),
                      "labels": "as stored in the cache"}
        packed = load_packed(cache_dir)
    n = min(len(packed), max_crystals) if max_crystals > 0 else len(packed)
    order = np.random.default_rng(0).permutation(len(packed))[:n]
    out.mkdir(parents=True, exist_ok=True)
    files, total = [], 0
    for k, idx in enumerate(index_batches(order, batch_size)):
        fb = assemble(packed, idx)
        arrays = {"bond_src": fb.bond_src.numpy().astype(np.int32), "bond_dst": fb.bond_dst.numpy().astype(np.int32),
                  "atom_crystal": fb.atom_crystal.numpy().astype(np.int32), "Z": fb.z.numpy().astype(np.uint8),
                  "y": fb.y.numpy().astype(np.float32), "y_mask": fb.y_mask.numpy()}
        if fb.bond_ratio is not None:
            arrays["bond_ratio"] = fb.bond_ratio.numpy()
        name = f"batch_{k:04d}.npz"
        with atomic_open(out / name, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        files.append(name)
        total += (out / name).stat().st_size
    meta = {
        "about": "mini-batches for bench/gpu.py --batches: global atom ids per batch; bonds flow bond_src -> "
                 "bond_dst (neighbour -> centre), sorted by crystal; atom_crystal: crystal of each atom; Z: atomic "
                 "numbers; y/y_mask: labels per target column (units below) and whether each is present",
        "targets": list(packed.targets), "units": dict(packed.units), "source": source,
        "n_crystals": int(n), "batch_size": int(batch_size), "files": files, "bytes": int(total),
        "has_bond_ratio": packed.bond_ratio is not None,
    }
    atomic_write_json(out / "meta.json", meta)
    if total > EXPORT_LIMIT:
        raise SystemExit(f"export is {total / 2**20:.1f} MiB, over the 64 MiB that can travel; lower --max-crystals")
    return meta


# --------------------------------------------------------------------------------------------------
# the pool of exported crystals (torch + numpy only)


@dataclass
class Pool:
    """Exported batches joined back into the packed layout :func:`cgnn_dgl.step.assemble` reads."""

    numbers: np.ndarray
    node_ptr: np.ndarray
    bond_src: np.ndarray
    bond_dst: np.ndarray
    edge_ptr: np.ndarray
    y: np.ndarray
    y_mask: np.ndarray
    bond_ratio: np.ndarray | None
    meta: dict

    def __len__(self) -> int:
        return int(self.y.shape[0])


def load_pool(folder: Path) -> Pool:
    meta = json.loads((folder / "meta.json").read_text())
    parts = {k: [] for k in ("numbers", "na", "nb", "src", "dst", "y", "mask", "ratio")}
    for name in meta["files"]:
        with np.load(folder / name) as a:
            crystal = a["atom_crystal"].astype(np.int64)
            n = a["y"].shape[0]
            na = np.bincount(crystal, minlength=n)
            first = np.concatenate([[0], np.cumsum(na)[:-1]])
            src, dst = a["bond_src"].astype(np.int64), a["bond_dst"].astype(np.int64)
            bond_crystal = crystal[dst]
            if np.any(np.diff(bond_crystal) < 0) or not np.array_equal(crystal[src], bond_crystal):
                raise SystemExit(f"{name}: bonds are not grouped by crystal; re-export with this script")
            parts["numbers"].append(a["Z"])
            parts["na"].append(na)
            parts["nb"].append(np.bincount(bond_crystal, minlength=n))
            parts["src"].append(src - first[bond_crystal])
            parts["dst"].append(dst - first[bond_crystal])
            parts["y"].append(a["y"])
            parts["mask"].append(a["y_mask"])
            parts["ratio"].append(a.get("bond_ratio"))
    na, nb = np.concatenate(parts["na"]), np.concatenate(parts["nb"])
    ratio = None if any(r is None for r in parts["ratio"]) else np.concatenate(parts["ratio"])
    return Pool(np.concatenate(parts["numbers"]), np.concatenate([[0], np.cumsum(na)]),
                np.concatenate(parts["src"]), np.concatenate(parts["dst"]), np.concatenate([[0], np.cumsum(nb)]),
                np.concatenate(parts["y"]), np.concatenate(parts["mask"]), ratio, meta)


def sample_batches(n_pool: int, batch_size: int, n_batches: int, seed: int) -> list[np.ndarray]:
    """``n_batches`` batches of ``batch_size`` crystals: epochs of shuffled pool rows, back to back
    (a batch larger than the pool repeats crystals)."""
    rng = np.random.default_rng(seed)
    need = batch_size * n_batches
    order = np.concatenate([rng.permutation(n_pool) for _ in range(need // n_pool + 1)])[:need]
    return [order[k * batch_size:(k + 1) * batch_size] for k in range(n_batches)]


# --------------------------------------------------------------------------------------------------
# measurements


def heads_for(pool: Pool) -> tuple[tuple[str, ...], list[int]]:
    """Model head names and the y columns they learn: the export's own targets where the model accepts
    them, else the first OQMD names as stand-ins for as many columns (throughput does not care)."""
    from cgnn_dgl import TARGETS
    from cgnn_dgl.config import ModelConfig
    from cgnn_dgl.errors import UsageError

    targets = tuple(pool.meta["targets"])
    try:
        ModelConfig.preset("benchmark", targets=targets)
        return targets, list(range(len(targets)))
    except UsageError:
        k = min(len(targets), len(TARGETS))
        return tuple(TARGETS[:k]), list(range(k))


def make_model(preset: str, heads, dtype, device, seed: int = 0):
    import torch

    from cgnn_dgl.model import CGNN, ModelConfig

    torch.manual_seed(seed)
    return CGNN(ModelConfig.preset(preset, targets=heads)).to(device=device, dtype=dtype).train()


def rel_error(a, b) -> float:
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / (scale if scale > 0 else 1.0)


def parity(pool: Pool, heads, cols, device, n_crystals: int) -> list[dict]:
    import torch

    from cgnn_dgl.step import assemble, masked_mse

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    fb = assemble(pool, np.arange(min(n_crystals, len(pool))), cols)
    rows = []
    for preset in PRESETS:
        for dtype in (torch.float64, torch.float32):
            cpu_model = make_model(preset, heads, dtype, "cpu")
            dev_model = copy.deepcopy(cpu_model).to(device)
            res = []
            for model, batch in ((cpu_model, fb), (dev_model, fb.to(device))):
                out = model(batch.z, batch.graph_index())
                masked_mse(out, batch.y.to(dtype), batch.y_mask).backward()
                res.append((out.detach().cpu(), [p.grad.detach().cpu() for p in model.parameters()]))
            fwd = rel_error(res[1][0], res[0][0])
            grad = max(rel_error(a, b) for a, b in zip(res[1][1], res[0][1]))
            name = str(dtype).replace("torch.", "")
            rows.append({"preset": preset, "dtype": name, "crystals": fb.n_crystals, "forward_rel_err": fwd,
                         "grad_rel_err": grad, "tolerance": TOL[name], "ok": fwd <= TOL[name] and grad <= TOL[name]})
    return rows


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(pool: Pool, heads, cols, device, preset: str, batch_size: int, amp: str, min_time: float,
               max_steps: int, warmup: int, deterministic: bool = False) -> dict:
    """Training structures/s fed by FlatLoader, the same steps on resident batches, peak memory."""
    import torch

    from cgnn_dgl.step import FlatLoader, set_deterministic, train_step

    set_deterministic(deterministic)
    try:
        model = make_model(preset, heads, torch.float32, device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for fb in FlatLoader(pool, sample_batches(len(pool), batch_size, warmup, seed=1), device, cols=cols):
            train_step(model, opt, fb, amp=amp)
        sync(device)
        # fed by the loader: as many steps as fit in min_time (at most max_steps)
        batches = sample_batches(len(pool), batch_size, max_steps, seed=2)
        loader = FlatLoader(pool, batches, device, cols=cols)
        steps, t0 = 0, time.perf_counter()
        loss = None
        for fb in loader:
            loss = train_step(model, opt, fb, amp=amp)
            steps += 1
            if steps % 4 == 0:
                sync(device)
                if time.perf_counter() - t0 >= min_time:
                    break
        sync(device)
        t_fed = time.perf_counter() - t0
        wait = loader.wait_s
        # the same number of steps on batches already on the device (capped at 16 distinct batches)
        resident = [fb for _, fb in zip(range(min(steps, 16)), FlatLoader(pool, batches, device, cols=cols))]
        sync(device)
        t0 = time.perf_counter()
        for k in range(steps):
            train_step(model, opt, resident[k % len(resident)], amp=amp)
        sync(device)
        t_res = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        return {"preset": preset, "batch": batch_size, "amp": amp, "deterministic": deterministic, "steps": steps,
                "structures_per_s": steps * batch_size / t_fed, "resident_structures_per_s": steps * batch_size / t_res,
                "outside_gpu_share": max(0.0, 1.0 - t_res / t_fed), "loader_wait_share": wait / t_fed,
                "peak_gpu_mib": peak, "final_loss": float(loss) if loss is not None else float("nan")}
    finally:
        set_deterministic(False)


# --------------------------------------------------------------------------------------------------
# DDP smoke run (torchrun, one process)


def ddp_worker(args) -> int:
    """One torchrun process: DDP-wrapped model, a few steps, an all_reduce check; result as JSON."""
    import torch
    import torch.distributed as dist

    from cgnn_dgl.step import FlatLoader, train_step

    cuda = not args.cpu_dry_run
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        pool = load_pool(Path(args.batches))
        heads, cols = heads_for(pool)
        model = make_model("benchmark", heads, torch.float32, device)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if cuda else None)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        bs = 64 if args.cpu_dry_run else 512
        losses = [float(train_step(net, opt, fb)) for fb in
                  FlatLoader(pool, sample_batches(len(pool), bs, 5, seed=3), device, cols=cols)]
        one = torch.ones(1, device=device)
        dist.all_reduce(one)
        result = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "steps": len(losses),
                  "losses": losses, "all_reduce_sum": float(one.item()),
                  "ok": all(np.isfinite(losses)) and float(one.item()) == dist.get_world_size()}
    finally:
        dist.destroy_process_group()
    Path(args.ddp_worker).write_text(json.dumps(result))
    return 0


def ddp_smoke(batches: Path, dry: bool, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "ddp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(Path(__file__).resolve()), "--batches", str(batches), "--ddp-worker", str(result)]
        if dry:
            cmd.append("--cpu-dry-run")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"torchrun did not finish in {timeout:.0f} s"}
        out = {"command": " ".join(cmd[1:]), "wall_s": time.perf_counter() - t0, "returncode": proc.returncode}
        if proc.returncode == 0 and result.is_file():
            out.update(json.loads(result.read_text()))
        else:
            out.update(ok=False, error=(proc.stderr or proc.stdout)[-2000:])
        return out


# --------------------------------------------------------------------------------------------------
# main


def run_bench(args) -> dict:
    import torch

    from cgnn_dgl.report import format_table

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit(f"no CUDA device (torch {torch.__version__}); use --cpu-dry-run to rehearse on the CPU")
    device = torch.device("cpu") if dry else torch.device("cuda")
    start = time.perf_counter()
    pool = load_pool(Path(args.batches))
    heads, cols = heads_for(pool)
    batch_sizes = tuple(args.batch_sizes) if args.batch_sizes else ((32, 128) if dry else (512, 4096))
    if dry:  # two steps per cell unless --min-time asks for a real CPU measurement
        min_time, max_steps, warmup = (0.0, 2, 1) if args.min_time is None else (args.min_time, 400, 2)
    else:
        min_time, max_steps, warmup = (2.0 if args.min_time is None else args.min_time), 400, 3
    report: dict = {
        "about": "bench/gpu.py: CGNN training on the DGL-free GPU path (cgnn_dgl.step): CPU-CUDA parity, "
                 "training throughput (structures/s = crystals per second of Adam steps incl. data path), peak "
                 "GPU memory (MiB, torch.cuda.max_memory_allocated), share of step time outside the GPU, "
                 "deterministic-mode cost, torchrun DDP smoke run",
        "dry_run": dry,
        "note": "CPU DRY RUN: CPU stands in for CUDA, small batches, gloo DDP; the figures only show the "
                "script works" if dry else "",
        "device": "cpu" if dry else torch.cuda.get_device_name(0),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "batches": str(args.batches), "export": pool.meta, "model_heads": list(heads),
        "pool_crystals": len(pool), "goal_structures_per_s_batch512": GOAL,
        "reference_gtx1080_structures_per_s": REFERENCE_GTX1080,
    }

    def budget_left() -> bool:
        return time.perf_counter() - start < args.time_budget

    print(f"bench/gpu.py on {report['device']} (torch {torch.__version__}, CUDA {torch.version.cuda}); "
          f"{len(pool)} crystals from {args.batches}{'  [CPU DRY RUN]' if dry else ''}", flush=True)
    report["parity"] = parity(pool, heads, cols, device, n_crystals=64 if dry else 512)
    print("\nCPU-CUDA parity, same weights and batch (max |cuda-cpu| / max |cpu|, worst tensor)")
    print(format_table([(r["preset"], r["dtype"], r["crystals"], r["forward_rel_err"], r["grad_rel_err"], r["tolerance"],
                         "ok" if r["ok"] else "FAIL") for r in report["parity"]],
                       ["preset", "dtype", "crystals", "forward", "gradients", "tolerance", "result"]), flush=True)

    rows = []
    for preset in PRESETS if args.only == "all" else ():
        for bs in batch_sizes:
            for amp in ("none", "bf16"):
                if not budget_left():
                    rows.append({"preset": preset, "batch": bs, "amp": amp, "skipped": "time budget"})
                    continue
                rows.append(throughput(pool, heads, cols, device, preset, bs, amp, min_time, max_steps, warmup))
                r = rows[-1]
                print(f"  {preset:10s} batch {bs:5d} {'bf16' if amp == 'bf16' else 'fp32'}: "
                      f"{r['structures_per_s']:,.0f} structures/s", flush=True)
    report["throughput"] = rows
    done = [r for r in rows if "skipped" not in r]
    if done:
        print("\ntraining throughput (structures/s; fp32 = float32, bf16 = bf16 autocast)")
        print(format_table([(r["preset"], r["batch"], "bf16" if r["amp"] == "bf16" else "fp32", r["structures_per_s"],
                         r["resident_structures_per_s"], r["outside_gpu_share"], r["loader_wait_share"],
                         r["peak_gpu_mib"], r["structures_per_s"] / GOAL[r["preset"]] if not dry and r["preset"] in GOAL and r["batch"] == 512 else float("nan"))
                        for r in done],
                       ["preset", "batch", "amp", "structures/s", "resident/s", "outside GPU", "loader wait",
                        "peak MiB", "of goal"]), flush=True)

    if budget_left():
        reps = 1 if dry and args.min_time is None else 3  # interleaved, median: other jobs share the machine
        det: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(reps):
            for flag in (False, True):
                det[flag].append(throughput(pool, heads, cols, device, "benchmark", batch_sizes[0], "none", min_time,
                                            max_steps, warmup, deterministic=flag)["structures_per_s"])
        fast, slow = float(np.median(det[False])), float(np.median(det[True]))
        report["deterministic"] = {"preset": "benchmark", "batch": batch_sizes[0], "repeats": reps,
                                   "structures_per_s_default": fast, "structures_per_s_deterministic": slow,
                                   "time_ratio": fast / slow}
        d = report["deterministic"]
        print(f"\ntrain.deterministic (benchmark, batch {batch_sizes[0]}, fp32): {d['structures_per_s_default']:,.0f} -> "
              f"{d['structures_per_s_deterministic']:,.0f} structures/s (step time x{d['time_ratio']:.2f})", flush=True)

    if args.only != "all":
        report["ddp"] = {"skipped": f"--only {args.only}", "ok": True}
    else:
        report["ddp"] = ddp_smoke(Path(args.batches), dry, timeout=120.0) if budget_left() else {"skipped": "time budget"}
    dd = report["ddp"]
    print(f"\ntorchrun DDP smoke run (1 process): {'ok' if dd.get('ok') else 'FAILED'}"
          f" backend {dd.get('backend')} steps {dd.get('steps')} in {dd.get('wall_s', float('nan')):.1f} s"
          + (f"\n{dd.get('error')}" if dd.get("error") else ""), flush=True)
    report["wall_s"] = time.perf_counter() - start
    report["ok"] = all(r["ok"] for r in report["parity"]) and bool(dd.get("ok"))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", metavar="DIR", help="write .npz batches from a cache (project venv, needs DGL)")
    ap.add_argument("--cache", metavar="DIR", help="with --export: graph cache to cut (default: dev corpus)")
    ap.add_argument("--batch-size", type=int, default=512, help="with --export: crystals per file")
    ap.add_argument("--max-crystals", type=int, default=0, help="with --export: at most this many (0 = all)")
    ap.add_argument("--batches", metavar="DIR", help="run the benchmark on exported batches")
    ap.add_argument("--cpu-dry-run", action="store_true", help="everything on the CPU, small sizes, gloo DDP")
    ap.add_argument("--out", default="bench-gpu.json", help="JSON report (default %(default)s)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="seconds of timed steps per throughput cell (default 2 on a GPU; dry run: 2 steps)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", metavar="N",
                    help="throughput batch sizes (default 512 4096; dry run 32 128)")
    ap.add_argument("--only", choices=["all", "deterministic"], default="all",
                    help="deterministic: only the train.deterministic cost (with parity), e.g. on the CPU")
    ap.add_argument("--time-budget", type=float, default=330.0, help="start no new part after this many s")
    ap.add_argument("--ddp-worker", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ddp_worker:
        return ddp_worker(args)
    if args.export:
        meta = export(Path(args.export), args.cache, args.batch_size, args.max_crystals)
        print(f"wrote {len(meta['files'])} batches, {meta['n_crystals']} crystals, {meta['bytes'] / 2**20:.2f} MiB, "
              f"targets {meta['targets']} to {args.export} (labels: {meta['source']['labels']})")
        return 0
    if not args.batches:
        ap.error("give --export DIR or --batches DIR")
    report = run_bench(args)
    Path(args.out).write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"\nwrote {args.out} in {report['wall_s']:.0f} s; {'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
