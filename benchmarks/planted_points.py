"""End to end on trained encoders: does the audit find images planted to be memorable?

Usage: python benchmarks/planted_points.py [--out /tmp/memlens-planted] [--epochs 60] [--seeds 2]

200 synthetic 16 px images from 4 prototypes with individual variation, plus 10 planted singletons
(atypical images) asked about as candidates in S_C; S_S and S_I hold typical images only. SimCLR
ResNet9 encoders, ``--seeds`` per side (each estimates an expectation over f or g in SSLMem's
definition), then one audit. Prints the planted points' ranks among all 260 audited points, the
SSLMem paper's C > S tests (Welch, Mann-Whitney) and the subset means, and checks the expected
outcome: every planted point in the top decile, C > S at p < 0.01, S_C > S_S > S_I, the report's
at-risk list led by planted points. Exit code 1 when a check fails.

Measured (2 seeds, 60 epochs, 2 threads, 1 min 53 s): planted ranks 1-9 and 14 of 260, C > S Welch
p = 1e-4; with one seed per side the tenth planted point fell to rank 98, and with 40 epochs to 148:
two encoders per side and 60 epochs are what this check needs. It was a test until the suite
outgrew CI's 10 minutes (about 2 minutes of CPU).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/memlens-planted")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()

    from memlens.audit import run_audit
    from memlens.config import AuditConfig, DataConfig, SplitConfig, SplitSizes, SyntheticConfig, TrainConfig
    from memlens.data import load, make_splits
    from memlens.dp.training import train_encoder

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = DataConfig(source="synthetic", synthetic=SyntheticConfig(n=200, n_test=60, image_size=16, outliers=10,
                                                                    seed=1))
    ds = load(data)
    planted = ds.meta["outlier_ids"]
    (out / "ask.txt").write_text("\n".join(planted) + "\n")
    make_splits(ds, SplitConfig(sizes=SplitSizes(S_S=120, S_C=40, S_I=40, S_E=60), candidates_file=str(out / "ask.txt"),
                                seed=0)).save(out / "splits.json")
    recipe = {"framework": "simclr", "data": data.model_dump(), "splits": str(out / "splits.json"),
              "model": {"arch": "resnet9"}, "augment": "mae", "epochs": args.epochs, "batch_size": 64,
              "optim": {"lr": 0.003}}
    for side in ("f", "g"):
        for seed in range(args.seeds):
            train_encoder(TrainConfig.model_validate({**recipe, "subsets": side, "seed": seed}), out / f"{side}{seed}",
                  dataset=ds)
    result = run_audit(AuditConfig(f=[str(out / f"f{s}") for s in range(args.seeds)],
                                   g=[str(out / f"g{s}") for s in range(args.seeds)],
                                   splits=str(out / "splits.json")), dataset=ds)
    points = result.points
    order = points.sort_values("sslmem", ascending=False)["id"].tolist()
    ranks = sorted(order.index(p) + 1 for p in planted)
    tests = {(t.name, t.method): t for t in result.summary.tests}
    means = {k: v.mean for k, v in result.summary.subsets.items()}
    top5 = {p["id"] for p in result.summary.top_points[:5]}
    print(f"planted points ranked {ranks} of {len(points)}")
    print(f"C > S: Welch p = {tests[('C>S', 'welch_t')].p_value:.2g}, "
          f"Mann-Whitney p = {tests[('C>S', 'mann_whitney_u')].p_value:.2g}")
    print("subset means: " + ", ".join(f"{k} {v:+.4f}" for k, v in sorted(means.items())))
    checks = {"every planted point in the top decile": ranks[-1] <= len(points) // 10,
              "C > S at p < 0.01 (Welch and Mann-Whitney)": tests[("C>S", "welch_t")].p_value < 0.01
              and tests[("C>S", "mann_whitney_u")].p_value < 0.01,
              "S_C > S_S > S_I": means["S_C"] > means["S_S"] > means["S_I"],
              "the at-risk list starts with planted points": top5 <= set(planted)}
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
