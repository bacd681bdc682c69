"""How many reference encoders a trustworthy at-risk list needs: reliability, replication and attack power
against K, on the demo's recipe (or any pipeline file's, with overrides).

Usage:
    python benchmarks/references.py [--pipeline pipelines/demo.yaml] [--ks 2,4,8] [--out /tmp/refs-bench]
        [--views 10] [--override '{"train": {"epochs": 400}, "split": {"sizes": {...}}}']

Trains, non-privately, two independent reference designs of max(K) encoders each (training seeds
disjoint). The second design draws its own halves of the same pool, its pair 0 included (its splits
put the pool's images in S_C and S_I at random again), so nothing but the images is shared: the
correlation between the two designs' scores is an honest replication. For each K it audits the
first K references of each design and prints, in one run:

* per score (SSLMem on alignment, and the same in/out estimate on the training loss where the
  objective has one): the encoder-level split-half reliability over the pool images (halves of the
  pairs, Spearman-Brown); the replicate Spearman between the two designs; the shared share of the
  top-10 and of the FDR-0.1 at-risk lists (Jaccard);
* the views-only reliability of SSLMem beside it;
* canary AUC and TPR at 1% FPR of alignment, loss, LiRA and RMIA scores (K >= 4: each reference
  attacked with the other pairs' references);
* the training time of K references (summed from the runs' records) and of one audit.

The variance components of the largest K project how many encoders a reliability of 0.9 needs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _replicate(a, b, score: str, flag: str) -> tuple[float, float, float, int, int]:
    """Spearman, top-10 share and FDR-list Jaccard of one score between two audits' points tables."""
    pool = a.index[a["candidate"].astype(bool)].intersection(b.index[b["candidate"].astype(bool)])
    sa, sb = a.loc[pool, score], b.loc[pool, score]
    rho = float(stats.spearmanr(sa, sb).statistic)
    top = len(set(sa.nlargest(10).index) & set(sb.nlargest(10).index)) / 10
    fa = set(pool[a.loc[pool, flag].astype(bool)])
    fb = set(pool[b.loc[pool, flag].astype(bool)])
    jac = len(fa & fb) / len(fa | fb) if fa | fb else float("nan")
    return rho, top, jac, len(fa), len(fb)


def _train_designs(cfg, data, splits, canaries, out: Path, kmax: int) -> dict:
    from memlens.config import TrainConfig
    from memlens.dp.training import train_encoder

    seconds = {}
    for design in (0, 1):
        for i in range(kmax):
            run = out / f"design{design}" / f"ref-{i:02d}"
            if not (run / "model.safetensors").is_file():
                tc = TrainConfig.model_validate({**cfg.train, "data": cfg.data.model_dump(),
                                                 "splits": str(splits[design]), "canaries": canaries,
                                                 "seed": 1000 * design + i // 2,
                                                 "reference": {"index": i, "k": kmax, "seed": design}})
                train_encoder(tc, run, dataset=data, force=True)
            seconds[(design, i)] = json.loads((run / "run.json").read_text())["wall_seconds"]
    return seconds


def _splits(cfg, data, out: Path) -> list[Path]:
    """The pipeline's splits, and a copy whose pool (S_C + S_I) is drawn into halves again."""
    from memlens.data import make_splits

    s0 = make_splits(data, cfg.split)
    s0.data = cfg.data
    s0.save(out / "splits-0.json")
    pool = np.array(s0.ids("S_C", "S_I"))
    rng = np.random.default_rng(12345)
    perm = rng.permutation(pool).tolist()
    n_c = len(s0.subsets["S_C"])
    s1 = s0.model_copy(deep=True)
    s1.subsets["S_C"], s1.subsets["S_I"] = perm[:n_c], perm[n_c:]
    s1.seed = s0.seed + 1
    s1.save(out / "splits-1.json")
    return [out / "splits-0.json", out / "splits-1.json"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="pipelines/demo.yaml")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--out", default="/tmp/memlens-references-bench")
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--masks", type=int, default=16, help="MAE masks per image for the loss scores")
    ap.add_argument("--override", default="{}", help="JSON merged into the pipeline (a recipe change)")
    args = ap.parse_args()

    import yaml

    from memlens.audit import run_audit
    from memlens.config import AuditConfig, PipelineConfig
    from memlens.data import load
    from memlens.data.canaries import make_canaries, save_canaries

    raw = yaml.safe_load(Path(args.pipeline).read_text())
    raw = _merge(raw, json.loads(args.override))
    raw.pop("references", None)
    cfg = PipelineConfig.model_validate({**raw, "policy": None} if "policy" in raw else raw)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in args.ks.split(",")]
    kmax = max(ks)
    data = load(cfg.data)
    splits = _splits(cfg, data, out)
    canaries = None
    if cfg.canaries:
        c = cfg.canaries
        from memlens.data.splits import Splits

        s0 = Splits.load(splits[0])
        cset = make_canaries(data, m=c.m, kinds=list(c.kinds), seed=c.seed, p_include=c.p_include,
                             exclude_ids=set(s0.ids("S_S", "S_C", "S_I", "S_E")))
        if not (out / "canaries" / "canaries.json").is_file():
            save_canaries(cset, out / "canaries")
        canaries = str(out / "canaries")
    seconds = _train_designs(cfg, data, splits, canaries, out, kmax)
    t = cfg.train
    print(f"recipe {args.pipeline} + {args.override}: {t.get('framework')} {t.get('model', {}).get('arch')}, "
          f"{t.get('epochs')} epochs, batch {t.get('batch_size')}; "
          f"S_S {len(json.loads(splits[0].read_text())['subsets']['S_S'])}, "
          f"pool {len(pool_ids(splits[0]))}; {cfg.canaries.m if cfg.canaries else 0} canaries; {args.views} views, "
          f"{args.masks} MAE masks")
    head = (f"{'K':>3} {'score':<6} {'rel(enc)':>8} {'rho(repl)':>9} {'top10':>6} {'FDR J':>6} {'at risk':>9} "
            f"{'rel(views)':>10} {'AUC':>6} {'TPR@1%':>7} {'LiRA':>6} {'RMIA':>6} {'train s':>8} {'audit s':>8}")
    print(head)
    last = {}
    for k in ks:
        results = []
        for design in (0, 1):
            refs = [str(out / f"design{design}" / f"ref-{i:02d}") for i in range(k)]
            t0 = time.perf_counter()
            # each design audited with its own seed: views and MAE masks are not shared either
            res = run_audit(AuditConfig(references=refs, splits=str(splits[design]), views=args.views,
                                        augment=cfg.audit.get("augment"), seed=design,
                                        privacy={**cfg.audit.get("privacy", {}), "mae_masks": args.masks}),
                            dataset=data)
            results.append((res, time.perf_counter() - t0))
        a, b = (r[0].points.set_index("id") for r in results)
        s0 = results[0][0].summary
        met = ((s0.privacy or {}).get("canaries") or {}).get("metrics") or {}
        train_s = sum(v for (d, i), v in seconds.items() if d == 0 and i < k)
        lm = s0.loss_memorization or {}
        rows = [("align", "sslmem", "at_risk", s0.reliability_encoders or {}, "align_ref", "lira_align", "rmia_align")]
        if "lossmem" in a.columns:
            rows.append(("loss", "lossmem", "lossmem_at_risk", lm.get("reliability_encoders") or {}, "loss_ref",
                         "lira_loss", "rmia_loss"))
        for name, score, flag, enc, base, lira, rmia in rows:
            rho, top, jac, na, nb = _replicate(a, b, score, flag)
            m = met.get(base, {})
            tpr = (m.get("tpr_at") or [{}])[0].get("tpr", float("nan"))
            print(f"{k:>3} {name:<6} {enc.get('reliability', float('nan')):>8.2f} {rho:>9.2f} {top:>6.1f} "
                  f"{jac:>6.2f} {na:>4}/{nb:<4} "
                  f"{s0.reliability['reliability'] if name == 'align' else float('nan'):>10.2f} "
                  f"{m.get('auc', float('nan')):>6.3f} {tpr:>7.3f} "
                  f"{met.get(lira, {}).get('auc', float('nan')):>6.3f} "
                  f"{met.get(rmia, {}).get('auc', float('nan')):>6.3f} "
                  f"{train_s:>8.0f} {results[0][1]:>8.0f}")
            last[name] = enc
    for name, enc in last.items():
        if enc:
            print(f"\n{name}: variance components at K = {kmax} (true, per pair, per view): {enc.get('components')}; "
                  f"about {2 * (enc.get('pairs_for_target') or float('nan')):.0f} encoders for reliability "
                  f"{enc.get('target')}")


def pool_ids(path: Path) -> list[str]:
    s = json.loads(path.read_text())["subsets"]
    return s["S_C"] + s["S_I"]


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
