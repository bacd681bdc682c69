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
from typing import Any, Callable

from memlens import distributed as D
from memlens.audit.engine import run_audit
from memlens.audit.results import AUDIT_FILE, read_audit, write_audit
from memlens.config import AuditConfig, PipelineConfig, SweepConfig, claim_resumable_dir, format_epsilon
from memlens.data.canaries import SET_FILE, load_canaries, make_canaries, save_canaries
from memlens.data.dataset import Dataset
from memlens.data.sources import load
from memlens.data.splits import Splits, make_splits
from memlens.dp.sweep import SweepRun, check_sweep, plan_runs, run_sweep
from memlens.errors import MemlensError
from memlens.integrity import load_private_key, public_key_text, signed_by
from memlens.io import sha256_file, write_json
from memlens.policy.gate import GateResult, to_junit, write_markdown
from memlens.policy.schema import Policy, load_policy
from memlens.reports.render import render_report
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


@dataclass
class Pipeline:
    """What the stages of one pipeline run share: its config, where it writes, the data and the plan
    (splits, canaries, the sweep's runs, one audit per privacy level), and how it reports progress."""

    config: PipelineConfig
    out: Path
    dataset: Dataset
    force: bool
    cache_dir: str | Path | None
    progress: Progress | None
    say: Callable[[str], None]
    jobs: int
    sign_key: str | Path | None
    log_detail: bool
    sweep: SweepConfig
    runs: list[SweepRun]
    audits: list[tuple[str, AuditConfig, Path]]  # (eps-<e>, config, directory), one per privacy level
    policy: Policy | None
    result: PipelineResult
    fresh_splits: Splits | None = None
    key: Any = None
    gate: GateResult | None = None  # the report's evaluation of the policy, written by the gate stage

    @property
    def splits_path(self) -> Path:
        return self.out / "splits.json"

    @property
    def canaries_dir(self) -> Path | None:
        return self.out / "canaries" if self.config.canaries else None


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: ``up_to_date(p)`` says why it can be skipped (None: run it), ``run(p)``
    does it on every process (process 0 alone writes) and says what it did. ``main_only`` stages run on
    process 0 alone (report, gate)."""

    name: str
    run: Callable[[Pipeline], str | None]
    up_to_date: Callable[[Pipeline], str | None] = lambda p: None
    main_only: bool = False
    announce: bool = True  # log "<name>: <status>" (training logs each run itself; report and gate print after)


def run_pipeline(config: PipelineConfig, out_dir: str | Path, *, force: bool = False,
                 cache_dir: str | Path | None = None, progress: Progress | None = None,
                 log: Callable[[str], None] | None = None, jobs: int = 1,
                 sign_key: str | Path | None = None, log_detail: bool = True) -> PipelineResult:
    """Run (or resume) the whole pipeline into ``out_dir``: :func:`plan`, then each of :func:`stages`.

    Resumption lives here: a stage whose output is up to date is skipped, naming why; the barrier
    after each stage (under ``torchrun``) is the one place processes wait for process 0's files.

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
    p = plan(config, Path(out_dir), force=force, cache_dir=cache_dir, progress=progress, say=say, jobs=jobs,
             sign_key=sign_key, log_detail=log_detail)
    for stage in stages(p):
        if stage.main_only and not main:
            break  # process 0 writes the report and the gate
        status = stage.up_to_date(p) or stage.run(p)
        if not stage.main_only:
            D.barrier()  # every process sees the stage's files before the next stage reads them
        if status is not None:
            p.result.stages[stage.name] = status
            if stage.announce:
                say(f"{stage.name}: {status}")
    p.result.seconds = time.perf_counter() - t0
    if main:
        _record(p)
    return p.result


def plan(config: PipelineConfig, out: Path, *, force: bool, cache_dir, progress, say, jobs: int, sign_key,
         log_detail: bool) -> Pipeline:
    """Everything checked before any work: the policy, the data, the splits (made, not yet written), that
    every privacy level can train (the splits decide N) and every audit config; then the output directory
    is claimed for this config."""
    policy = load_policy(config.policy) if config.policy else None  # fail early on a bad policy
    dataset = load(config.data, cache_dir=cache_dir, collective=D.active())
    splits_path = out / "splits.json"
    fresh_splits = None
    if not splits_path.is_file() or force:
        fresh_splits = make_splits(dataset, config.split)
        fresh_splits.data = config.data
    canaries_str = str((out / "canaries").resolve()) if config.canaries else None
    sweep = config.sweep_config(str(splits_path.resolve()), canaries_str)
    runs = plan_runs(sweep, out / "sweep")
    if fresh_splits is not None:
        with tempfile.TemporaryDirectory() as tmp:
            fresh_splits.save(Path(tmp) / "splits.json")
            check_sweep(plan_runs(config.sweep_config(str(Path(tmp) / "splits.json")), out / "sweep"),
                        dataset=dataset, cache_dir=cache_dir)  # without canaries: they are made after this check
    audits = [(f"eps-{format_epsilon(eps)}", _audit_config(config, runs, eps, str(splits_path.resolve())),
               out / "audits" / f"eps-{format_epsilon(eps)}") for eps in sweep.epsilons]
    if D.is_main():
        claim_resumable_dir(out, marker=PIPELINE_FILE, config=config, what="pipeline", force=force)
    D.barrier()
    return Pipeline(config, out, dataset, force, cache_dir, progress, say, jobs, sign_key, log_detail, sweep, runs,
                    audits, policy, PipelineResult(out), fresh_splits,
                    load_private_key(sign_key) if sign_key is not None else None)


def _audit_config(config: PipelineConfig, runs: list[SweepRun], eps: float, splits: str) -> AuditConfig:
    """The audit of one privacy level: its f and g runs, or its references."""
    mine = [r for r in runs if r.epsilon == eps or (math.isinf(eps) and math.isinf(r.epsilon))]

    def dirs(side) -> list[str]:
        return [str(r.run_dir.resolve()) for r in mine if side(r.side)]

    return config.audit_config(f=dirs(lambda s: s == "f"), g=dirs(lambda s: s == "g"),
                               references=dirs(lambda s: s.startswith("ref-")), splits_path=splits)


def stages(p: Pipeline) -> list[Stage]:
    """The pipeline's stages in order: split, canaries, train, probe, one audit per privacy level,
    report, gate."""
    out = [Stage("split", _split, _split_exists)]
    if p.config.canaries:
        out.append(Stage("canaries", _canaries, _canaries_exist))
    out += [Stage("train", _train, announce=False), Stage("probe", _probe, announce=False)]
    out += [Stage(f"audit {name}", _audit_stage(cfg, adir), _audit_up_to_date(cfg, adir))
            for name, cfg, adir in p.audits]
    out += [Stage("report", _report, main_only=True, announce=False),
            Stage("gate", _gate, main_only=True, announce=False)]
    return out


# ----------------------------------------------------------------------------- the stages


def _split_exists(p: Pipeline) -> str | None:
    if p.fresh_splits is not None:
        return None
    Splits.load(p.splits_path, p.dataset)  # a splits file of other data is refused here
    return "skipped (exists)"


def _split(p: Pipeline) -> str:
    if D.is_main():
        p.fresh_splits.save(p.splits_path)
    return "done"


def _canaries_exist(p: Pipeline) -> str | None:
    if not (p.canaries_dir / SET_FILE).is_file():
        return None
    load_canaries(p.canaries_dir, dataset=p.dataset)
    return "skipped (exists)"


def _canaries(p: Pipeline) -> str:
    """Canaries made from the splits: marked canaries use images no encoder trains on."""
    c = p.config.canaries
    splits = Splits.load(p.splits_path, p.dataset)
    cset = make_canaries(p.dataset, m=c.m, kinds=list(c.kinds), seed=c.seed, p_include=c.p_include,
                         exclude_ids=set(splits.ids("S_S", "S_C", "S_I", "S_E")))
    if D.is_main():
        save_canaries(cset, p.canaries_dir)
    return f"{c.m} made"


def _train(p: Pipeline) -> str:
    """f and g (or the references) per privacy level; the sweep resumes interrupted runs itself."""
    total, done = len(p.runs) * p.sweep.train.epochs, 0

    def count(epochs: int) -> None:
        nonlocal done
        done += epochs
        if p.progress:
            p.progress("training", done, total)

    outcomes = run_sweep(p.sweep, p.out / "sweep", cache_dir=p.cache_dir, dataset=p.dataset,
                         on_run=lambda run, what: count(run.config.epochs) if what == "done" else None,
                         on_epoch=lambda info: count(1), jobs=p.jobs, sign_key=p.sign_key, log=p.say,
                         log_detail=p.log_detail)
    return ", ".join(sorted({w for _, w in outcomes}))


def _probe(p: Pipeline) -> str:
    if not p.config.probe:
        return "off"
    if p.dataset.labels is None:
        return "skipped (no labels)"
    for k, run in enumerate(p.runs):
        if D.is_main() and read_run(run.run_dir).probe is None:
            probe_run(run.run_dir, dataset=p.dataset, sign_key=p.key)
        if p.progress:
            p.progress("probing", k + 1, len(p.runs))
    return "done"


def _audit_up_to_date(cfg: AuditConfig, adir: Path) -> Callable[[Pipeline], str | None]:
    """An audit already written is up to date when it has these settings, read these very run records
    and, with a signing key, is signed by it."""
    def check(p: Pipeline) -> str | None:
        if not (adir / AUDIT_FILE).is_file():
            return None
        try:
            existing = read_audit(adir)
        except MemlensError:
            return None
        fresh = existing.summary.settings == cfg and all(
            r.run_json_sha256 == _sha(Path(r.path) / "run.json") for r in existing.summary.runs) and (
            p.key is None or signed_by(existing.summary.integrity, public_key_text(p.key)))
        return "skipped (up to date)" if fresh else None
    return check


def _audit_stage(cfg: AuditConfig, adir: Path) -> Callable[[Pipeline], str]:
    def audit(p: Pipeline) -> str:
        p.say(f"audit {adir.name}: running")
        progress = (lambda stage, d, t: p.progress(f"auditing {adir.name}", d, t)) if p.progress else None
        res = run_audit(cfg, cache_dir=p.cache_dir, dataset=p.dataset, progress=progress)
        if D.is_main():
            write_audit(res, adir, force=True, sign_key=p.key)
        return "done"
    return audit


def _report(p: Pipeline) -> str:
    c = p.config
    rep = render_report([adir for _, _, adir in p.audits], out_pdf=p.out / "report.pdf",
                        out_html=p.out / "report.html" if c.report.html else None, policy=p.policy,
                        redact=c.report.redact, title=c.report.title, cache_dir=p.cache_dir)
    p.result.files += [x for x in (rep.pdf, rep.html) if x]
    p.gate = rep.gate  # the report already evaluated the policy on the same audits
    return f"{rep.pages} pages"


def _gate(p: Pipeline) -> str | None:
    gate = p.gate
    if gate is None:
        return None
    out = p.out
    write_json(out / "gate.json", {"policy": gate.policy, "passed": gate.passed,
                                    "results": [r.to_dict() for r in gate.results]})
    write_markdown(gate, out / "gate.md")
    to_junit(gate, out / "junit.xml")
    p.result.files += [out / "gate.json", out / "gate.md", out / "junit.xml"]
    p.result.gate_passed, p.result.gate_exit = gate.passed, gate.exit_code
    return "passed" if gate.passed else "FAILED"


def _record(p: Pipeline) -> None:
    """pipeline.json: the config, what each stage did, the time and the verdict."""
    r = p.result
    r.files = [p.splits_path, *([p.canaries_dir] if p.canaries_dir else []), p.out / "sweep",
               *[adir for _, _, adir in p.audits], *r.files]
    write_json(p.out / PIPELINE_FILE, {"version": 1, "config": p.config.model_dump(mode="json"), "stages": r.stages,
                                       "seconds": round(r.seconds, 1), "gate_passed": r.gate_passed})


def _sha(path: Path) -> str:
    return sha256_file(path) if path.is_file() else ""
