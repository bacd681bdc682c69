"""Throughput of training and of the audit with 1 and N processes under torchrun.

Usage:
    python benchmarks/scaling.py [--nproc 1,2] [--rounds 2] [--device cpu]
    python benchmarks/scaling.py --nproc 1,2,4,8 --device cuda --data DIR_OR_TAR   # on a GPU node

Launches ``torchrun --standalone --nproc_per_node N -m memlens train|audit`` (Gloo on CPUs, NCCL on
GPUs: the same command), alternating the process counts round by round so the machine's drift
hits all alike, and reports images/s from the run records (training: global images per second,
first epoch excluded) and audit records (images forwarded / scoring-pass seconds), with the
speed-up over one process.

On this project's 2-core machine one process already uses both cores (2 intra-op threads), so
two Gloo processes of one thread each can at best match it: the CPU rows check that
distribution costs little, not that it speeds up. On GPUs each process drives its own device
and the throughput grows with the number of GPUs until the data pipeline or the all-reduce
limits it (DDP overlaps the gradient all-reduce with the backward pass; the audit has no
communication but one gather at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def torchrun(n: int, args: list[str], env: dict) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "memlens",
           *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", help="a folder or .tar.gz (default: the bundled digits)")
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    counts = [int(x) for x in args.nproc.split(",")]
    root = Path(tempfile.mkdtemp(prefix="memlens-scaling-"))
    from memlens.config import DataConfig, SplitConfig, SplitSizes
    from memlens.data import load, make_splits

    data = DataConfig(source="folder", path=str(Path(args.data).resolve())) if args.data else DataConfig()
    ds = load(data)
    splits = make_splits(ds, SplitConfig(sizes=SplitSizes(S_S=1000, S_C=200, S_I=200, S_E=200)
                                         if args.data else None))
    splits.data = data
    splits.save(root / "s.json")
    train_cfg = {"framework": "mae", "data": data.model_dump(), "splits": str(root / "s.json"), "subsets": "f",
                 "model": {"arch": "vit_mini"}, "epochs": args.epochs, "batch_size": 128, "device": args.device,
                 "mae": {"mask_ratio": 0.5}}
    (root / "train.yaml").write_text(yaml.safe_dump(train_cfg))
    env = {**os.environ}
    if args.device == "cpu":
        env["MEMLENS_BACKEND"] = "gloo"
    results: dict[int, dict[str, list[float]]] = {n: {"train": [], "audit": []} for n in counts}
    # the g run for the audits, trained once
    torchrun(1, ["train", "--config", str(root / "train.yaml"), "--subsets", "g", "--out", str(root / "g")], env)
    for r in range(args.rounds):
        for n in (counts if r % 2 == 0 else counts[::-1]):
            env_n = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // n))} if args.device == "cpu" \
                else env
            run_dir = root / f"f-{n}-{r}"
            torchrun(n, ["train", "--config", str(root / "train.yaml"), "--out", str(run_dir)], env_n)
            hist = json.loads((run_dir / "run.json").read_text())["history"][1:]
            results[n]["train"].append(statistics.mean(h["images_per_s"] for h in hist))
            adir = root / f"a-{n}-{r}"
            torchrun(n, ["audit", "--f", str(run_dir), "--g", str(root / "g"), "--splits", str(root / "s.json"),
                         "--out", str(adir), "--device", args.device], env_n)
            t = json.loads((adir / "audit.json").read_text())["timings"]
            results[n]["audit"].append(t["images_forwarded"] / t["pass"])
    base = {k: statistics.median(results[counts[0]][k]) for k in ("train", "audit")}
    print(f"{args.device}, {os.cpu_count()} cores, median of {args.rounds} alternating rounds; MAE vit_mini, "
          f"batch 128 (global), audit of {len(splits.ids('S_C', 'S_S', 'S_I', 'S_E'))} points x 10 views")
    print(f"{'processes':>10}{'train img/s':>14}{'speed-up':>10}{'audit img/s':>14}{'speed-up':>10}")
    for n in counts:
        tr, au = statistics.median(results[n]["train"]), statistics.median(results[n]["audit"])
        print(f"{n:>10}{tr:>14.0f}{tr / base['train']:>10.2f}{au:>14.0f}{au / base['audit']:>10.2f}")


if __name__ == "__main__":
    main()
