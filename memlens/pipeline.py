"""The one-command pipeline (``memlens run``): split, train f and g per epsilon (the sweep),
probe, audit each epsilon, render the report and evaluate the gate.

Resumable: a stage whose output is already there and matches is skipped (interrupted training
runs are resumed), so a rerun after an interruption or a policy change only redoes what is
needed. Layout of the output directory::

    pipeline.json  splits.json  sweep/eps-<e>/{f,g}[-seedN]/  audits/eps-<e>/
    report.pdf  report.html  gate.json  gate.md  junit.xml
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from memlens import distributed as D
from memlens.audit.engine import run_audit
from memlens.audit.results import AUDIT_FILE, read_audit, write_audit
from memlens.config import PipelineConfig, claim_resumable_dir, format_epsilon
from memlens.data import Splits, load, make_splits
from memlens.data.canaries import SET_FILE, load_canaries, make_canaries, save_canaries
from memlens.dp.sweep import check_sweep, plan_runs, run_sweep
from memlens.errors import MemlensError
from memlens.integrity import load_private_key, public_key_text, signed_by
from memlens.io import sha256_file, write_json
from memlens.policy import load_policy, to_junit
from memlens.policy.gate import write_markdown
from memlens.reports import render_report
from memlens.train.probe import probe_run
from memlens.train.run import read_run

PIPELINE_FILE = "pipeline.json"


@dataclass
class PipelineResult:
    out: Path
    files: list[Path] = field(default_factory=list)
    stages: dict[str, str] = field(default_factory=dict)
    gate_passed: bool | None = None
    gate_exit: int = 0
    seconds: float = 0.0


Progress = Callable[[str, int, int], None]


def run_pipeline(config: PipelineConfig, out_dir: str | Path, *, force: bool = False,
                 cache_dir: str | Path | None = None, progress: Progress | None = None,
                 log: Callable[[str], None] | None = None, jobs: int = 1,
                 sign_key: str | Path | None = None, log_detail: bool = True) -> PipelineResult:
    """Run (or resume) the whole pipeline into ``out_dir``.

    Args:
        progress: progress(stage, done, total) for long stages.
        log: one line per stage event (and per encoder started and finished; with ``log_detail``, also at
            each quarter of its epochs, with the time left).
        jobs: encoders trained at once in separate processes (see :func:`memlens.dp.sweep.run_sweep`).
        sign_key: an Ed25519 private key file: every run record and audit is signed with it (an audit
            already written counts as up to date only if it is signed by that key).
    """

    t0 = time.perf_counter()
    main = D.is_main()
    say = (log or (lambda _msg: None)) if main else (lambda _msg: None)
    out = Path(out_dir)
    policy = load_policy(config.policy) if config.policy else None  # fail early on a bad policy
    dataset = load(config.data, cache_dir=cache_dir, collective=D.active())
    splits_path = out / "splits.json"
    fresh_splits = None
    if not splits_path.is_file() or force:
        fresh_splits = make_splits(dataset, config.split)
        fresh_splits.data = config.data
    splits_str = str(splits_path.resolve())
    canaries_dir = out / "canaries" if config.canaries else None
    canaries_str = str(canaries_dir.resolve()) if canaries_dir else None
    sweep_cfg = config.sweep_config(splits_str, canaries_str)
    sweep_dir = out / "sweep"
    runs = plan_runs(sweep_cfg, sweep_dir)
    # Every privacy level must be able to train before the first one starts (the splits decide N).
    if fresh_splits is not None:
        with tempfile.TemporaryDirectory() as tmp:
            fresh_splits.save(Path(tmp) / "splits.json")
            check_sweep(plan_runs(config.sweep_config(str(Path(tmp) / "splits.json")), sweep_dir), dataset=dataset,
                        cache_dir=cache_dir)  # without canaries: they are made after this check
    if main:
        claim_resumable_dir(out, marker=PIPELINE_FILE, config=config, what="pipeline", force=force)
    D.barrier()
    result = PipelineResult(out)

    # 1. splits
    if fresh_splits is None:
        Splits.load(splits_path, dataset)
        result.stages["split"] = "skipped (exists)"
    else:
        if main:
            fresh_splits.save(splits_path)
        D.barrier()
        result.stages["split"] = "done"
    say(f"split: {result.stages['split']}")

    # 1b. canaries (made from the splits: marked canaries use images no encoder trains on)
    if config.canaries:

        if (canaries_dir / SET_FILE).is_file():
            load_canaries(canaries_dir, dataset=dataset)
            result.stages["canaries"] = "skipped (exists)"
        else:
            splits = Splits.load(splits_path, dataset)
            c = config.canaries
            cset = make_canaries(dataset, m=c.m, kinds=list(c.kinds), seed=c.seed, p_include=c.p_include,
                                 exclude_ids=set(splits.ids("S_S", "S_C", "S_I", "S_E")))
            if main:
                save_canaries(cset, canaries_dir)
            D.barrier()
            result.stages["canaries"] = f"{c.m} made"
        say(f"canaries: {result.stages['canaries']}")

    # 2. training: f and g per epsilon
    total_epochs = len(runs) * sweep_cfg.train.epochs
    done_epochs = 0

    def on_run(run, what):  # the progress lines come from run_sweep's log (memlens.progress)
        nonlocal done_epochs
        if what == "done":  # a run trained in another process: its epochs at once
            done_epochs += run.config.epochs
            if progress:
                progress("training", done_epochs, total_epochs)

    def on_epoch(info):
        nonlocal done_epochs
        done_epochs += 1
        if progress:
            progress("training", done_epochs, total_epochs)

    outcomes = run_sweep(sweep_cfg, sweep_dir, cache_dir=cache_dir, dataset=dataset, on_run=on_run, on_epoch=on_epoch,
                         jobs=jobs, sign_key=sign_key, log=say, log_detail=log_detail)
    key = load_private_key(sign_key) if sign_key is not None else None
    result.stages["train"] = ", ".join(sorted({w for _, w in outcomes}))

    # 3. linear probes
    if config.probe and dataset.labels is not None:
        for k, run in enumerate(runs):
            if main and read_run(run.run_dir).probe is None:
                probe_run(run.run_dir, dataset=dataset, sign_key=key)
            if progress:
                progress("probing", k + 1, len(runs))
        D.barrier()
        result.stages["probe"] = "done"
    else:
        result.stages["probe"] = "skipped (no labels)" if config.probe else "off"

    # 4. audits, one per epsilon
    audit_dirs = []
    for eps in sweep_cfg.epsilons:
        eps_runs = [r for r in runs if r.epsilon == eps or (math.isinf(eps) and math.isinf(r.epsilon))]
        cfg = config.audit_config(f=[str(r.run_dir.resolve()) for r in eps_runs if r.side == "f"],
                                  g=[str(r.run_dir.resolve()) for r in eps_runs if r.side == "g"],
                                  references=[str(r.run_dir.resolve()) for r in eps_runs
                                              if r.side.startswith("ref-")],
                                  splits_path=splits_str)
        adir = out / "audits" / f"eps-{format_epsilon(eps)}"
        audit_dirs.append(adir)
        if (adir / AUDIT_FILE).is_file():
            try:
                existing = read_audit(adir)
                fresh = existing.summary.settings == cfg and all(
                    r.run_json_sha256 == _sha(Path(r.path) / "run.json") for r in existing.summary.runs) and (
                    key is None or signed_by(existing.summary.integrity, public_key_text(key)))
            except MemlensError:
                fresh = False
            if fresh:
                say(f"audit eps-{format_epsilon(eps)}: skipped (up to date)")
                continue
        say(f"audit eps-{format_epsilon(eps)}: running")
        res = run_audit(cfg, cache_dir=cache_dir, dataset=dataset,
                        progress=(lambda stage, d, t, eps=eps: progress(f"auditing eps-{format_epsilon(eps)}", d, t))
                        if progress else None)
        if main:
            write_audit(res, adir, force=True, sign_key=key)
        D.barrier()
    result.stages["audit"] = "done"
    if not main:  # process 0 writes the report and the gate
        result.seconds = time.perf_counter() - t0
        return result

    # 5. report and 6. gate
    rep = render_report(audit_dirs, out_pdf=out / "report.pdf",
                        out_html=out / "report.html" if config.report.html else None, policy=policy,
                        redact=config.report.redact, title=config.report.title, cache_dir=cache_dir)
    result.files += [p for p in (rep.pdf, rep.html) if p]
    result.stages["report"] = f"{rep.pages} pages"
    gate = rep.gate  # the report already evaluated the policy on the same audits
    if gate is not None:
        write_json(out / "gate.json", {"policy": gate.policy, "passed": gate.passed,
                                        "results": [r.to_dict() for r in gate.results]})
        write_markdown(gate, out / "gate.md")
        to_junit(gate, out / "junit.xml")
        result.files += [out / "gate.json", out / "gate.md", out / "junit.xml"]
        result.gate_passed, result.gate_exit = gate.passed, gate.exit_code
        result.stages["gate"] = "passed" if gate.passed else "FAILED"
    result.files = [splits_path, *([canaries_dir] if canaries_dir else []), sweep_dir, *audit_dirs, *result.files]
    result.seconds = time.perf_counter() - t0
    write_json(out / PIPELINE_FILE, {"version": 1, "config": config.model_dump(mode="json"), "stages": result.stages,
                        "seconds": round(result.seconds, 1), "gate_passed": result.gate_passed})
    return result


def _sha(path: Path) -> str:

    return sha256_file(path) if path.is_file() else ""
