"""Reading images of their own sizes: memlens's lazy loader against torchvision's ImageFolder + DataLoader.

Usage:
    python benchmarks/data_throughput.py [--sizes 2000,20000] [--images 1536] [--workers 2] [--rounds 3]
        [--root /tmp/memlens-data-bench] [--augment mae,normal]

Generates (seeded, once, kept under ``--root``) folders of JPEGs of mixed sizes (160-500 px on each
side, both orientations, smooth photo-like content) with N = 2,000 and 20,000 images, and the same
images as WebDataset-style tar shards. Then, for each N and augmentation set, it measures in fresh
processes, alternating the variants round by round (the machine's speed drifts; alternating cancels
that):

* ``memlens folder`` / ``memlens shards``: ``memlens.data.load`` (index cached by an untimed first
  load; the cold index time is printed separately), then ``--images`` images of a random order read
  by ``memlens.data.loader.fetch`` in batches of 64: workers decode and cut each view from the
  original at 224 px, the process applies the rest of the set and normalises;
* ``torchvision``: ``torchvision.datasets.ImageFolder`` with the same set as a per-image
  ``transforms.v2`` pipeline (``memlens.data.augment.torchvision_pipeline``) + normalisation, a
  ``DataLoader`` with the same workers, batch size and shuffling.

For each: time to the first batch, images/s over the rest, and peak memory of the process tree (the
sum of the processes' proportional set size, PSS, sampled every 20 ms: forked workers share pages,
which plain RSS would count once per process). It prints memlens / torchvision images/s (target
>= 0.9) and memlens's peak memory at N = 20,000 / N = 2,000 (target <= 1.3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- data


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs, 160-500 px per side, 10 classes, smooth content with texture (compresses like a photo)."""
    from PIL import Image

    done = root / f"folder-{n}" / ".complete"
    if done.is_file():
        return done.parent
    rng = np.random.default_rng(seed)
    for k in range(n):
        h, w = (int(v) for v in rng.integers(160, 501, size=2))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        f = rng.uniform(0.01, 0.08, size=(3, 2))
        ph = rng.uniform(0, 6.3, size=3)
        img = np.stack([127 + 90 * np.sin(f[c, 0] * yy + f[c, 1] * xx + ph[c]) for c in range(3)], axis=-1)
        img += rng.normal(0, 8, size=img.shape)
        p = done.parent / f"c{k % 10}" / f"{k:06d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)
    done.write_text("")
    return done.parent


def make_shards(folder: Path, per_shard: int = 1000) -> str:
    out = folder.parent / f"{folder.name}-shards"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    n_shards = (len(files) + per_shard - 1) // per_shard
    if not (out / ".complete").is_file():
        import io

        out.mkdir(parents=True, exist_ok=True)
        for s in range(n_shards):
            with tarfile.open(out / f"train-{s:04d}.tar", "w") as tar:
                for rel in files[s * per_shard:(s + 1) * per_shard]:
                    tar.add(folder / rel, arcname=rel)
                    label = rel.split("/")[0].encode()
                    info = tarfile.TarInfo(rel.rsplit(".", 1)[0] + ".class")
                    info.size = len(label)
                    tar.addfile(info, io.BytesIO(label))
        (out / ".complete").write_text("")
    return str(out / f"train-{{0000..{n_shards - 1:04d}}}.tar")


# ----------------------------------------------------------------------------- one measurement (child)


class PeakMemory:
    """Peak of the summed PSS of this process and its children, sampled in a thread."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _tree(self) -> list[int]:
        pids, todo = [], [os.getpid()]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    todo += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
        return pids

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(self._pss(p) for p in self._tree()))
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(variant: str, source: str, augment: str, images: int, workers: int, cache: str) -> dict:
    import torch

    torch.set_num_threads(1)
    batch = 64
    n_batches = max(2, images // batch)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        if variant == "torchvision":
            from torchvision import datasets
            from torchvision.transforms import v2

            from memlens.data.augment import torchvision_pipeline

            # the usual fast form: the set on the PIL image, then to a float tensor and normalised
            tf = v2.Compose([torchvision_pipeline(augment, 224), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                             v2.Normalize([0.5] * 3, [0.25] * 3)])
            ds = datasets.ImageFolder(source, transform=tf)
            loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                                 generator=torch.Generator().manual_seed(0))
            batches = (x for x, _ in loader)
        else:
            from memlens.config import DataConfig
            from memlens.data import Augmenter, load
            from memlens.data.loader import Unit, fetch
            from memlens.rng import RowStreams, stream_keys

            kind = "shards" if variant.endswith("shards") else "folder"
            data = load(DataConfig(source=kind, path=source, cache="none"), cache_dir=cache)
            aug = Augmenter(augment, size=224, mean=[0.5] * 3, std=[0.25] * 3)
            order = np.random.default_rng(0).permutation(len(data))[:n_batches * batch]
            units = [Unit(order[k:k + batch], stream_keys(0, order[k:k + batch].tolist(), "bench"))
                     for k in range(0, len(order), batch)]
            got = fetch(data.pixels, units, mode="cut", device=torch.device("cpu"), workers=workers,
                        geometry=aug.geometry(1), augmenter=aug)
            batches = (aug(u.images, RowStreams(unit.keys)) for u, unit in zip(got, units, strict=True))
        first = None
        count = 0
        for k, x in enumerate(batches):
            assert x.shape[-1] == 224 and x.dtype == torch.float32
            if k == 0:
                first = time.perf_counter() - t0
                t1 = time.perf_counter()
            else:
                count += len(x)
            if k + 1 >= n_batches:
                break
        rate = count / (time.perf_counter() - t1)
    return {"variant": variant, "first_batch_s": first, "images_per_s": rate, "peak_bytes": mem.peak}


def run_child(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def cold_index_seconds(source: str, kind: str, cache: Path) -> float:
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    run_child(["index", kind, source, str(cache)])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,20000")
    ap.add_argument("--images", type=int, default=1536, help="images read per measurement")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--augment", default="mae,normal")
    ap.add_argument("--root", default="/tmp/memlens-data-bench")
    ap.add_argument("--child", nargs="*")
    args = ap.parse_args()
    if args.child:
        if args.child[0] == "index":
            from memlens.config import DataConfig
            from memlens.data import load

            _, kind, source, cache = args.child
            load(DataConfig(source=kind, path=source, cache="none"), cache_dir=cache)
            print(json.dumps({}))
            return
        variant, source, augment, images, workers, cache = args.child
        print(json.dumps(measure(variant, source, augment, int(images), int(workers), cache)))
        return

    root = Path(args.root)
    print(f"workers {args.workers}, {args.images} images per measurement, batches of 64, 224 px, "
          f"{args.rounds} alternating rounds; cores available: {len(os.sched_getaffinity(0))}")
    peaks: dict[int, float] = {}
    for n in (int(x) for x in args.sizes.split(",")):
        t0 = time.perf_counter()
        folder = make_folder(root, n)
        pattern = make_shards(folder)
        print(f"\nN = {n:,}: data ready in {time.perf_counter() - t0:.0f} s ({folder})")
        cache = root / f"cache-{n}"
        cold_folder = cold_index_seconds(str(folder), "folder", cache / "folder")
        cold_shards = cold_index_seconds(pattern, "shards", cache / "shards")
        print(f"  cold index (sha256 of every file, header check): folder {cold_folder:.1f} s, shards "
              f"{cold_shards:.1f} s")
        for augment in args.augment.split(","):
            rows: dict[str, list[dict]] = {}
            for _ in range(args.rounds):
                for variant, source, c in (("memlens folder", str(folder), cache / "folder"),
                                           ("memlens shards", pattern, cache / "shards"),
                                           ("torchvision", str(folder), cache / "folder")):
                    rows.setdefault(variant, []).append(run_child([variant, source, augment, str(args.images),
                                                                   str(args.workers), str(c)]))
            med = {v: {k: statistics.median(r[k] for r in rs) for k in ("first_batch_s", "images_per_s",
                                                                          "peak_bytes")}
                   for v, rs in rows.items()}
            base = med["torchvision"]["images_per_s"]
            print(f"  augment {augment}:")
            for v, m in med.items():
                print(f"    {v:<15} first batch {m['first_batch_s']:5.2f} s   {m['images_per_s']:6.1f} img/s "
                      f"({m['images_per_s'] / base:.2f}x torchvision)   peak {m['peak_bytes'] / 2**20:6.0f} MiB")
            peaks.setdefault(n, med["memlens folder"]["peak_bytes"])
    if len(peaks) >= 2:
        small, large = min(peaks), max(peaks)
        print(f"\nmemlens peak memory, N = {large:,} / N = {small:,}: {peaks[large] / peaks[small]:.2f}x "
              f"(target <= 1.3)")


if __name__ == "__main__":
    main()
