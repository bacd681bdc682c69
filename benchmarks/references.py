"""How many reference encoders a trustworthy at-risk list needs: reliability, replication and attack power
against K, on the demo's recipe (or any pipeline file's).

Usage:
    python benchmarks/references.py [--pipeline pipelines/demo.yaml] [--ks 2,4,8] [--out /tmp/refs-bench]
        [--epochs N] [--views 10]

Trains, non-privately, two independent reference designs of max(K) encoders each (design seeds 0
and 1, training seeds disjoint), then for each K audits the first K references of each design and
prints, in one run:

* the encoder-level split-half reliability of per-image SSLMem over the pool images (two halves of
  the pairs, Spearman-Brown), and the views-only reliability beside it;
* the replicate overlap between the two independent designs: Spearman of the per-image scores, the
  shared share of the top-10 and of the FDR-0.1 at-risk lists (Jaccard);
* canary AUC and TPR at 1% FPR of SSLMem-style (align_ref), loss (loss_ref), LiRA and RMIA scores
  (K >= 4: each reference attacked with the other pairs' references);
* the wall time of training K references and of the audit.

The projection of the variance components (how many encoders would reach 0.9) is printed for the
largest K.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="pipelines/demo.yaml")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--out", default="/tmp/memlens-references-bench")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (a recipe change)")
    ap.add_argument("--views", type=int, default=10)
    args = ap.parse_args()

    from memlens.audit import run_audit
    from memlens.config import AuditConfig, PipelineConfig, TrainConfig, load_yaml
    from memlens.data import load, make_splits
    from memlens.data.canaries import make_canaries, save_canaries
    from memlens.dp import train

    cfg = load_yaml(PipelineConfig, args.pipeline)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in args.ks.split(",")]
    kmax = max(ks)
    data = load(cfg.data)
    splits = make_splits(data, cfg.split)
    splits.data = cfg.data
    splits.save(out / "splits.json")
    canaries = None
    if cfg.canaries:
        c = cfg.canaries
        cset = make_canaries(data, m=c.m, kinds=list(c.kinds), seed=c.seed, p_include=c.p_include,
                             exclude_ids=set(splits.ids("S_S", "S_C", "S_I", "S_E")))
        save_canaries(cset, out / "canaries")
        canaries = str(out / "canaries")
    recipe = dict(cfg.train)
    if args.epochs:
        recipe["epochs"] = args.epochs
    train_seconds = {}
    for design in (0, 1):
        for i in range(kmax):
            run = out / f"design{design}" / f"ref-{i:02d}"
            t0 = time.perf_counter()
            tc = TrainConfig.model_validate({**recipe, "data": cfg.data.model_dump(), "splits": str(out / "splits.json"),
                                             "canaries": canaries, "seed": 1000 * design + i // 2,
                                             "reference": {"index": i, "k": kmax, "seed": design}})
            if not (run / "model.safetensors").is_file():
                train(tc, run, dataset=data, force=True)
            train_seconds[(design, i)] = time.perf_counter() - t0
    print(f"recipe {args.pipeline}: {recipe.get('epochs')} epochs; {len(splits.ids('S_C', 'S_I'))} pool images; "
          f"{cfg.canaries.m if cfg.canaries else 0} canaries; {args.views} views")
    print(f"{'K':>3} {'rel(enc)':>8} {'rel(views)':>10} {'rho(repl)':>9} {'top10':>6} {'FDR list':>8} "
          f"{'at risk':>8} {'AUC sslmem':>10} {'AUC loss':>8} {'AUC LiRA':>8} {'AUC RMIA':>8} {'TPR@1% LiRA':>11} "
          f"{'train s':>7} {'audit s':>7}")
    for k in ks:
        results = []
        for design in (0, 1):
            # a design of K: its first K/2 pairs (a complete smaller design of the same halves)
            refs = [str(out / f"design{design}" / f"ref-{i:02d}") for i in range(k)]
            t0 = time.perf_counter()
            res = run_audit(AuditConfig(references=refs, splits=str(out / "splits.json"), views=args.views,
                                        augment=cfg.audit.get("augment")), dataset=data)
            results.append((res, time.perf_counter() - t0))
        a, b = (r[0].points.set_index("id") for r in results)
        pool = a.index[a["candidate"].astype(bool)]
        sa, sb = a.loc[pool, "sslmem"], b.loc[pool, "sslmem"]
        rho = float(stats.spearmanr(sa, sb).statistic)
        top_a, top_b = set(sa.nlargest(10).index), set(sb.nlargest(10).index)
        fa, fb = set(pool[a.loc[pool, "at_risk"].astype(bool)]), set(pool[b.loc[pool, "at_risk"].astype(bool)])
        jac = len(fa & fb) / len(fa | fb) if fa | fb else float("nan")
        s0 = results[0][0].summary
        enc = s0.reliability_encoders or {}
        met = ((s0.privacy or {}).get("canaries") or {}).get("metrics") or {}

        def auc(name):
            return met.get(name, {}).get("auc", float("nan"))

        tpr = met.get("lira_loss", met.get("lira_align", {})).get("tpr_at", [{}])[0].get("tpr", float("nan"))
        train_s = sum(v for (d, i), v in train_seconds.items() if d == 0 and i < k)
        print(f"{k:>3} {enc.get('reliability', float('nan')):>8.2f} {s0.reliability['reliability']:>10.2f} "
              f"{rho:>9.2f} {len(top_a & top_b) / 10:>6.1f} {jac:>8.2f} {len(fa):>3}/{len(fb):<4} "
              f"{auc('align_ref'):>10.3f} {auc('loss_ref'):>8.3f} {max(auc('lira_loss'), auc('lira_align')) if k >= 4 else float('nan'):>8.3f} "
              f"{max(auc('rmia_loss'), auc('rmia_align')) if k >= 4 else float('nan'):>8.3f} {tpr:>11.3f} "
              f"{train_s:>7.0f} {results[0][1]:>7.0f}")
        last = enc
    if last:
        comp = last.get("components", {})
        print(f"\nvariance components at K = {kmax} (per image, per pair, per view): {comp}")
        print(f"projection: about {2 * last.get('pairs_for_target', float('nan')):.0f} encoders for reliability "
              f"{last.get('target')} at {args.views} views")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
