"""Calibration of the per-image findings on negative and positive controls, at K = 2, 4 and 8 encoders.

Usage: python benchmarks/calibration.py [--out /tmp/memlens-calibration] [--epochs 60] [--pairs 4]
                                        [--replicates 5] [--threads 2]

Synthetic 16 px images (4 prototypes, individual variation, 10 planted atypical images), SimCLR
ResNet9 encoders in f/g pairs of one seed each (K = 2P encoders: the first P pairs of one set).
The candidates S_C are 80 images of which only 40 are trained on by f (the 10 planted ones among
them); the other 40 are audited as candidates but trained on by no encoder: true nulls among the
candidates, so every one of them on an at-risk list is a false discovery. Controls: S_S (120, in
every encoder) and S_E (120, in none).

Audits, each with the estimator of this version (``inference.null: controls``) and the previous
one (``inference.null: model``: the moderated t / views-only p-values on uncentred scores):

* negative controls: random-init encoders (``--replicates`` audits of fresh random pairs per K),
  encoders trained on identical data (f and g both on S_S + trained S_C + S_I, different seeds);
  DP at epsilon 1 (K = 2 and 4: DP training is the slow part);
* positive control: the planted design above (truth: the 40 held-out candidates are null; the 10
  planted images are the memorable ones).

Per audit: the fraction of null p-values below 0.05 and 0.01 (the null candidates, and on negative
controls every candidate) against its binomial 95% range, whether any null image is listed at FDR
0.1, the realized FDP (listed nulls / listed) and the power on the planted images. Prints one table
with both estimators side by side and exits 1 when a check fails: for this version, every negative
control's null fraction below 0.05 inside its binomial 99.9% range, the share of negative-control
audits listing anything at most q plus its binomial slack, the mean FDP at most q, and power on the
planted images at K = 8 at least the previous estimator's.

Measured (defaults, one run; the full table is in the README, "Calibration on controls"):
negative-control audits listing any null image 0 of 18 (previous estimator: 5 of 18, one random
pair with 66 of 80 null candidates listed); mean FDP 0.013 (previous 0.217); power on the planted
images at K = 8 0.80 (previous 0.60); all four checks ok; audits 600 s after training.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

Q = 0.1


def _splits(out: Path, ds, planted: list[str], seed: int = 0):
    """The audit's splits (S_C: 80 candidates) and the training splits (S_C: the 40 f trains on)."""
    from memlens.config import SplitConfig, SplitSizes
    from memlens.data import make_splits

    (out / "ask.txt").write_text("\n".join(planted) + "\n")
    audit = make_splits(ds, SplitConfig(sizes=SplitSizes(S_S=120, S_C=80, S_I=40, S_E=120),
                                        candidates_file=str(out / "ask.txt"), seed=seed))
    rng = np.random.default_rng(seed)
    others = [i for i in audit.subsets["S_C"] if i not in set(planted)]
    rng.shuffle(others)
    trained = sorted(planted + others[:30])
    held_out = sorted(set(audit.subsets["S_C"]) - set(trained))
    train = audit.model_copy(deep=True)
    train.subsets["S_C"] = trained
    train.requested = []
    audit.save(out / "audit_splits.json")
    train.save(out / "train_splits.json")
    return trained, held_out


def _train(out: Path, ds, data, *, name: str, subsets: str, seed: int, epochs: int, dp: dict | None = None) -> dict:
    """Train one encoder on the training splits and export it as a spec the audit loads by its weights
    (SimCLR ResNet9; under DP a MAE ViT, since DP-SGD needs a per-example loss)."""
    from memlens.config import TrainConfig
    from memlens.dp.training import train_encoder
    from memlens.train.export import export_run

    model = {"framework": "mae", "model": {"arch": "vit_micro"}, "augment": "none"} if dp else \
        {"framework": "simclr", "model": {"arch": "resnet9"}, "augment": "mae"}
    recipe = {**model, "data": data.model_dump(), "splits": str(out / "train_splits.json"), "epochs": epochs,
              "batch_size": 64, "optim": {"lr": 0.003}, "subsets": subsets, "seed": seed, **({"dp": dp} if dp else {})}
    run = out / name
    if not (run / "model.safetensors").exists():
        shutil.rmtree(run, ignore_errors=True)
        train_encoder(TrainConfig.model_validate(recipe), run, dataset=ds)
    weights = out / f"{name}.export.safetensors"
    weights.unlink(missing_ok=True)
    return {**export_run(run, weights), "name": name}


def _random_spec(out: Path, name: str, seed: int, like: dict) -> dict:
    """A random-init encoder of the same kind as ``like`` (its factory and kwargs), saved with weights."""
    import importlib

    import torch
    from safetensors.torch import save_file

    path = out / f"{name}.safetensors"
    if not path.exists():
        module, factory = like["model"][3:].split(":")
        torch.manual_seed(seed)
        net = getattr(importlib.import_module(module), factory)(**like["kwargs"])
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return {**like, "weights": str(path), "name": name}


def _audit(out: Path, ds, f: list[dict], g: list[dict], null: str) -> "object":
    from memlens.audit import run_audit
    from memlens.config import AuditConfig

    # per-image SSLMem is what is calibrated here: one layer hooked, no unit null (UnitMem is not measured)
    layers = ["res6"] if "resnet" in json.dumps(f[0]) else ["norm"]
    cfg = AuditConfig(f=f, g=g, splits=str(out / "audit_splits.json"), augment="mae", views=10,
                      inference={"null": null}, unitmem={"permutations": 0}, layers=layers)
    return run_audit(cfg, dataset=ds)


def _row(result, *, nulls: set[str], planted: set[str]) -> dict:
    """Calibration figures of one audit: null p-values, any null listed, FDP and power."""
    from scipy import stats

    pts = result.points
    cand = pts[pts.candidate]
    null = cand[cand["id"].isin(nulls)]
    p = null["mem_p"].to_numpy(float)
    listed = cand[cand["at_risk"].astype(bool)]
    false = int(listed["id"].isin(nulls).sum())
    lo, hi = stats.binom.ppf([0.0005, 0.9995], len(p), 0.05) / len(p)
    return {"n_null": len(p), "below_05": float(np.mean(p < 0.05)), "below_01": float(np.mean(p < 0.01)),
            "range_05": (float(lo), float(hi)), "listed": len(listed), "false": false,
            "fdp": false / len(listed) if len(listed) else 0.0,
            "power": float(listed["id"].isin(planted).sum() / len(planted)) if planted else None,
            "self_check": ((result.summary.inference.get("null") or {}).get("self_check") or {}).get("passed")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/memlens-calibration")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--pairs", type=int, default=4, help="largest number of f/g pairs (K = 2 x pairs)")
    ap.add_argument("--replicates", type=int, default=5, help="random-init audits per K")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-dp", action="store_true", help="leave out the DP epsilon 1 control")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from memlens.config import DataConfig, SyntheticConfig
    from memlens.data import load

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = DataConfig(source="synthetic", synthetic=SyntheticConfig(n=500, n_test=150, image_size=16, outliers=10,
                                                                    seed=1))
    ds = load(data)
    planted = list(ds.meta["outlier_ids"])
    trained, held_out = _splits(out, ds, planted)
    all_cand = set(trained) | set(held_out)
    ks = [k for k in (1, 2, 4) if k <= args.pairs]
    specs = {"planted": ([], []), "identical": ([], [])}
    for i in range(max(ks)):
        specs["planted"][0].append(_train(out, ds, data, name=f"f{i}", subsets="f", seed=i, epochs=args.epochs))
        specs["planted"][1].append(_train(out, ds, data, name=f"g{i}", subsets="g", seed=i, epochs=args.epochs))
        specs["identical"][0].append(_train(out, ds, data, name=f"all{2 * i}", subsets="all", seed=100 + 2 * i,
                                            epochs=args.epochs))
        specs["identical"][1].append(_train(out, ds, data, name=f"all{2 * i + 1}", subsets="all",
                                            seed=101 + 2 * i, epochs=args.epochs))
    if not args.no_dp:
        specs["dp eps 1"] = ([], [])
        for i in range(min(2, max(ks))):
            for side in ("f", "g"):
                specs["dp eps 1"][0 if side == "f" else 1].append(
                    _train(out, ds, data, name=f"dp-{side}{i}", subsets=side, seed=i, epochs=args.epochs,
                           dp={"epsilon": 1.0, "max_grad_norm": 1.0}))
    print(f"trained in {time.perf_counter() - t0:.0f} s")
    like = specs["planted"][0][0]
    rows = []
    for p in ks:
        cases = [("planted", specs["planted"], set(held_out), set(planted)),
                 ("identical data", specs["identical"], all_cand, set()),
                 *([("dp eps 1", specs["dp eps 1"], set(held_out), set(planted))]
                   if "dp eps 1" in specs and p <= len(specs["dp eps 1"][0]) else [])]
        for r in range(args.replicates):
            rf = [_random_spec(out, f"rand-f{r}-{i}", 1000 * r + i, like) for i in range(p)]
            rg = [_random_spec(out, f"rand-g{r}-{i}", 1000 * r + 500 + i, like) for i in range(p)]
            cases.append((f"random init #{r + 1}", (rf, rg), all_cand, set()))
        for name, (f, g), nulls, truth in cases:
            for null in ("controls", "model"):
                res = _audit(out, ds, f[:p], g[:p], null)
                rows.append({"k": 2 * p, "case": name, "estimator": "this" if null == "controls" else "previous",
                             **_row(res, nulls=nulls, planted=truth)})
                _print(rows[-1])
    return _report(rows, time.perf_counter() - t0, max(ks))


def _print(r: dict) -> None:
    power = "" if r["power"] is None else f"{r['power']:.2f}"
    print(f"K={r['k']:<2} {r['case']:<16} {r['estimator']:<8} null p<.05 {r['below_05']:.3f} "
          f"(range {r['range_05'][0]:.3f}-{r['range_05'][1]:.3f}) p<.01 {r['below_01']:.3f} listed {r['listed']:>3} "
          f"false {r['false']:>3} FDP {r['fdp']:.2f} power {power:>4} self-check {r['self_check']}", flush=True)


def _report(rows: list[dict], seconds: float, max_pairs: int) -> int:
    this = [r for r in rows if r["estimator"] == "this"]
    prev = [r for r in rows if r["estimator"] == "previous"]
    negative = [r for r in this if r["case"] != "planted" and r["case"] != "dp eps 1"]
    neg_prev = [r for r in prev if r["case"] != "planted" and r["case"] != "dp eps 1"]
    share = np.mean([r["false"] > 0 for r in negative])
    share_prev = np.mean([r["false"] > 0 for r in neg_prev])
    slack = 2 * np.sqrt(Q * (1 - Q) / len(negative))
    fdp = np.mean([r["fdp"] for r in this])
    fdp_prev = np.mean([r["fdp"] for r in prev])
    top_k = 2 * max_pairs
    power = [r["power"] for r in this if r["case"] == "planted" and r["k"] == top_k]
    power_prev = [r["power"] for r in prev if r["case"] == "planted" and r["k"] == top_k]
    print(f"\n| estimator | negative-control audits listing any null image | mean FDP (all audits) | power on planted, "
          f"K = {top_k} |")
    print("|---|---|---|---|")
    print(f"| this (controls' null) | {share:.2f} of {len(negative)} | {fdp:.3f} | {power[0]:.2f} |")
    print(f"| previous (model) | {share_prev:.2f} of {len(neg_prev)} | {fdp_prev:.3f} | {power_prev[0]:.2f} |")
    checks = {
        "every negative control's null fraction below 0.05 in its binomial 99.9% range":
            all(r["range_05"][0] <= r["below_05"] <= r["range_05"][1] for r in negative),
        f"negative-control audits listing anything <= q + slack ({Q + slack:.2f})": share <= Q + slack,
        f"mean FDP <= q ({Q})": fdp <= Q,
        "power on the planted images at the largest K >= the previous estimator's": power[0] >= power_prev[0],
    }
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    print(f"total {seconds:.0f} s")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
