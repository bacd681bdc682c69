"""The ``memlens`` command line: parse, call one library function, map the result to an exit code.

Exit codes: 0 success; 1 a gate failed; 2 bad input (one line on stderr); 130 interrupted.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from memlens.audit.results import read_audit, write_audit
from memlens.config import (
    AuditConfig,
    CanaryConfig,
    DataConfig,
    EncoderSpec,
    PipelineConfig,
    ReferencesConfig,
    SplitFile,
    SweepConfig,
    TrainConfig,
    deep_update,
    load_yaml,
    validate,
)
from memlens.data.canaries import load_canaries, make_canaries, save_canaries
from memlens.data.references import DESIGN_FILE, ReferenceDesign, write_design_files
from memlens.errors import MemlensError
from memlens.integrity import generate_key, load_private_key, public_key_text
from memlens.io import check_writable as _check
from memlens.io import output_lock, read_json, sha256_file, write_json
from memlens.policy import evaluate, load_policy, to_junit
from memlens.policy.gate import write_markdown
from memlens.policy.schema import DEFAULT_INCREASES, Baseline
from memlens.reports import render_report
from memlens.reports.card import write_card
from memlens.reports.text import audit_lines

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Audit self-supervised vision encoders for memorization of their training data.")
dp_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                     help="Differential-privacy tools.")
app.add_typer(dp_app, name="dp")


def _cache_dir() -> Optional[str]:
    return os.environ.get("MEMLENS_CACHE_DIR") or None


def _fail(message: str, code: int = 2) -> None:
    # One plain line (no rich wrapping), so scripts and CI logs can grep it.
    sys.stderr.write(f"memlens: error: {message}\n")
    raise typer.Exit(code)


def command(fn, *, on=None):
    """Register a command whose MemlensError becomes a one-line error and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MemlensError as exc:
            _fail(str(exc))
        except OSError as exc:  # a disk or permission problem met while writing: one line, not a traceback
            if not isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)) \
                    and exc.errno not in (28, 30, 122):  # ENOSPC, EROFS, EDQUOT
                raise
            _fail(f"{exc.filename or 'an output'}: {exc.strerror or exc}")
        except KeyboardInterrupt:
            name = fn.__name__
            hint = {"train": "re-run the same command with --resume to continue from the last epoch",
                    "run": "re-run the same command to continue: finished stages are skipped, interrupted training "
                           "resumes", "sweep": "re-run the same command to continue: finished runs are skipped, "
                                               "interrupted ones resume"}.get(name, "nothing was written")
            sys.stderr.write(f"memlens: interrupted; completed work is kept ({hint})\n")
            raise typer.Exit(130) from None

    return (on or app).command()(wrapper)


def _console():
    # rich: optional or slow to import, loaded only on this path
    from rich.console import Console

    return Console()


def _overrides(pairs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in pairs.items() if v is not None}


# ----------------------------------------------------------------------------- split


@command
def split(
    out: Path = typer.Option(..., "--out", "-o", help="splits.json to write"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML with data: and split: sections"),
    source: Optional[str] = typer.Option(None, help="data source: digits, synthetic, folder (also .tar/.tar.gz), "
                                                    "shards (WebDataset tar shards), hf (a datasets dataset saved "
                                                    "to disk), parquet, npz, manifest"),
    path: Optional[str] = typer.Option(None, "--path", help="folder, .tar/.tar.gz, shard pattern, saved datasets "
                                                            "directory, parquet file or folder, .npz or manifest .csv"),
    test_path: Optional[str] = typer.Option(None, "--test-path", help="shards and parquet: the files of the test "
                                                                      "part"),
    resize: Optional[int] = typer.Option(None, help="resize images to RESIZE x RESIZE"),
    seed: Optional[int] = typer.Option(None, help="split seed"),
    candidates: Optional[Path] = typer.Option(None, help="file of ids (one per line) that must be candidates"),
    sizes: Optional[str] = typer.Option(None, help="explicit sizes, e.g. S_S=4000,S_C=500,S_I=500,S_E=500"),
    members_f: Optional[Path] = typer.Option(None, "--members-f", help="list of the images f was trained on"),
    members_g: Optional[Path] = typer.Option(None, "--members-g", help="list of the images g was trained on"),
    extra: Optional[Path] = typer.Option(None, "--extra", help="list of images neither was trained on (S_E)"),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="CSV path,subset[,label] declaring membership"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing splits file"),
):
    """Cut a dataset into S_S (shared), S_C (candidates), S_I (independent) and S_E (extra).

    Either at random (the papers' setup, for encoders memlens will train) or from the membership
    of encoders trained elsewhere: --members-f/--members-g/--extra lists, or --manifest.
    """
    # torch: loaded where this runs, so importing memlens.cli stays light
    from memlens.data.membership import membership_splits
    from memlens.data.sources import load
    from memlens.data.splits import make_splits

    if out.exists() and not force:
        raise MemlensError(f"{out} already exists; pass --force to overwrite it")
    check_writable(out, what="splits file")
    if members_f or members_g or manifest:
        if config or source or path or test_path or candidates or sizes:
            raise MemlensError("membership splits take no --config, --source, --path, --test-path, --candidates or "
                               "--sizes")
        splits, dataset = membership_splits(out, members_f=members_f, members_g=members_g, extra=extra,
                                            manifest=manifest, resize=resize, force=force, cache_dir=_cache_dir())
    else:
        over = _overrides({"data.source": source, "data.path": path, "data.test_path": test_path,
                           "data.resize": resize, "split.seed": seed,
                           "split.candidates_file": str(candidates) if candidates else None})
        if sizes:
            over["split.sizes"] = _sizes_option(sizes)
        cfg = load_yaml(SplitFile, config, overrides=over) if config else validate(
            SplitFile, deep_update({}, over), source="options")
        dataset = load(cfg.data, cache_dir=_cache_dir())
        splits = make_splits(dataset, cfg.split)
        splits.data = cfg.data
    splits.skipped = list(dataset.meta.get("skipped") or [])
    splits.save(out)
    s = splits.sizes()
    typer.echo(f"wrote {out}: S_S {s['S_S']}, S_C {s['S_C']}, S_I {s['S_I']}, S_E {s['S_E']} "
               f"(data {dataset.source}, fingerprint {dataset.fingerprint[:12]})")
    if splits.skipped:
        shown = ", ".join(f"{x.get('id')} ({x.get('problem')})" for x in splits.skipped[:5])
        typer.echo(f"left out {len(splits.skipped)} unreadable image(s) (on_bad_image: skip; recorded in {out}): "
                   f"{shown}{' ...' if len(splits.skipped) > 5 else ''}")


def _sizes_option(sizes: str) -> dict[str, int]:
    try:
        return {k.strip(): int(v) for k, v in (p.split("=") for p in sizes.split(","))}
    except ValueError:
        raise MemlensError(f"--sizes must look like S_S=4000,S_C=500; got '{sizes}'") from None


# ----------------------------------------------------------------------------- train


@command
def train(
    out: Path = typer.Option(..., "--out", "-o", help="run directory"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="training YAML"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run"),
    force: bool = typer.Option(False, "--force", help="delete an existing run in --out first"),
    framework: Optional[str] = typer.Option(None, help="mae, simclr, simsiam, dino, supervised"),
    arch: Optional[str] = typer.Option(None, help="vit_tiny, vit_mini, vit_micro, resnet9, resnet18"),
    epochs: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    splits: Optional[str] = typer.Option(None, help="splits.json"),
    subsets: Optional[str] = typer.Option(None, help="f (S_S+S_C), g (S_S+S_I) or all"),
    source: Optional[str] = typer.Option(None, help="data source"),
    data_path: Optional[str] = typer.Option(None, help="data path (folder, archive or npz)"),
    augment: Optional[str] = typer.Option(None, help="augmentation set"),
    dp_epsilon: Optional[float] = typer.Option(None, help="train with DP-SGD to this epsilon"),
    dp_delta: Optional[float] = typer.Option(None, help="DP delta (default 1/(10 N))"),
    dp_max_grad_norm: Optional[float] = typer.Option(None, help="per-sample clipping norm"),
    dp_accountant: Optional[str] = typer.Option(None, help="prv or rdp"),
    dp_noise_multiplier: Optional[float] = typer.Option(None, help="fixed noise multiplier"),
    dp_physical_batch_size: Optional[int] = typer.Option(None, help="largest physical batch under DP"),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N or mps"),
    precision: Optional[str] = typer.Option(None, help="fp32, bf16 or fp16 (autocast; DP-SGD runs in fp32)"),
    input_size: Optional[int] = typer.Option(None, help="side of the encoder's input (default: the data's size "
                                                        "when all images share one, else 224)"),
    workers: Optional[str] = typer.Option(None, help="DataLoader workers decoding images, or 'auto'"),
    threads: Optional[str] = typer.Option(None, help="intra-op threads, or 'auto'"),
    reference: Optional[int] = typer.Option(None, "--reference", help="train reference i (0..K-1) of a K-reference "
                                                                     "design (with --of K)"),
    of: Optional[int] = typer.Option(None, "--of", help="K, the number of references"),
    references_seed: Optional[int] = typer.Option(None, "--references-seed", help="seed of the design's halves "
                                                                                  "(default 0)"),
    sign_key: Optional[Path] = typer.Option(None, "--sign-key", help="Ed25519 private key (PEM) signing the finished "
                                                                     "run record (default: $MEMLENS_SIGNING_KEY)"),
):
    """Train an encoder (MAE, SimCLR, SimSiam, DINO, supervised; DP-SGD with --dp-epsilon).

    References: each of the K runs of a design is its own job (``--reference i --of K``, the same
    config and --seed for every run of one design, or seed + i // 2 as sweeps do so that the two
    encoders of a pair share it), so a cluster trains them as an array of independent jobs.

    Under torchrun, every process trains its share of each global batch (batch_size is global).
    """
    # torch and timm: imported by the commands that train or score, not by gate, report or card
    from memlens import distributed as dist
    from memlens.dp.training import train_encoder

    over = _overrides({"framework": framework, "model.arch": arch, "epochs": epochs, "batch_size": batch_size,
                       "optim.lr": lr, "seed": seed, "splits": splits, "subsets": subsets, "data.source": source,
                       "data.path": data_path, "augment": augment, "dp.epsilon": dp_epsilon, "dp.delta": dp_delta,
                       "dp.max_grad_norm": dp_max_grad_norm, "dp.accountant": dp_accountant,
                       "dp.noise_multiplier": dp_noise_multiplier, "dp.physical_batch_size": dp_physical_batch_size,
                       "device": device, "precision": precision, "model.input_size": input_size,
                       "workers": _count_option(workers, "--workers"), "threads": _count_option(threads, "--threads"),
                       "reference.index": reference, "reference.k": of, "reference.seed": references_seed})
    if (reference is None) != (of is None):
        raise MemlensError("--reference i and --of K go together (reference i of a K-reference design)")
    cfg = load_yaml(TrainConfig, config, overrides=over) if config else (
        None if resume and not over else validate(TrainConfig, deep_update({}, over), source="options"))
    console = _console()
    check_writable(out, what="run directory")
    key = _signing_key(sign_key)
    with _writer(out):
        result = train_encoder(cfg, out, resume=resume, force=force, cache_dir=_cache_dir(),
                               on_epoch=functools.partial(_print_epoch, console), sign_key=key)
    if dist.is_main():
        _print_run(console, result.record, out, signed=key is not None)


def _print_epoch(console, info) -> None:
    extra = "".join(f"  {k} {v}" for k, v in info.extra.items() if k in ("epsilon",))
    console.print(f"epoch {info.epoch}/{info.epochs}  loss {info.loss:.4f}  lr {info.lr:.2e}  "
                  f"{info.images_per_s:,.0f} img/s{extra}", highlight=False)


def _print_run(console, rec, out: Path, *, signed: bool) -> None:
    for warning in rec.warnings:
        console.print(f"[yellow]warning: {warning}[/]", highlight=False)
    if rec.status == "stopped_budget":
        console.print(f"[yellow]{rec.message}[/]")
    console.print(f"run {rec.status}: {out} ({rec.epochs_done} epochs, {rec.wall_seconds:.1f} s, "
                  f"{rec.images_per_s or 0:,.0f} img/s)" + (", run record signed" if signed else ""),
                  highlight=False)


# ----------------------------------------------------------------------------- probe


@command
def probe(
    run_dir: Path = typer.Argument(..., help="run directory"),
    max_train: int = typer.Option(5000, help="cap on probe training images"),
):
    """Linear-probe accuracy of a run's frozen encoder (stored in its run.json)."""
    # timm, torch: loaded where this runs, so importing memlens.cli stays light
    from memlens.train.probe import probe_run

    r = probe_run(run_dir, cache_dir=_cache_dir(), max_train=max_train)
    typer.echo(f"linear probe accuracy {r.accuracy:.4f} (train {r.train_set}: {r.n_train}, "
               f"test {r.test_set}: {r.n_test})")


# ----------------------------------------------------------------------------- privacy


@command
def privacy(
    run_dir: Optional[Path] = typer.Argument(None, help="a trained run directory"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="a training YAML, before training"),
    dp_epsilon: Optional[float] = typer.Option(None, help="override the config's target epsilon"),
    dp_delta: Optional[float] = typer.Option(None),
    epochs: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    dp_noise_multiplier: Optional[float] = typer.Option(None),
):
    """The differential-privacy guarantee of a run (or of a config, before training)."""
    # opacus, timm, torch: loaded where this runs, so importing memlens.cli stays light
    from memlens.dp.guarantee import planned_guarantee, run_guarantee

    if (run_dir is None) == (config is None):
        raise MemlensError("give either a run directory or --config")
    if run_dir is not None:
        g = run_guarantee(run_dir)
        typer.echo(f"{run_dir}: {g.sentence()}" + ("" if g.status in (None, "complete") else f" [status: {g.status}]"))
        return
    over = _overrides({"dp.epsilon": dp_epsilon, "dp.delta": dp_delta, "epochs": epochs, "batch_size": batch_size,
                       "dp.noise_multiplier": dp_noise_multiplier})
    p = planned_guarantee(load_yaml(TrainConfig, config, overrides=over), cache_dir=_cache_dir())
    typer.echo(p.sentence())


def selfcheck(
    config: Path = typer.Option(..., "--config", "-c", help="a DP training YAML (the run to instrument)"),
    m: int = typer.Option(20000, "--m", help="number of gradient canaries"),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, "--out", help="also write selfcheck.json here"),
    dp_epsilon: Optional[float] = typer.Option(None, help="override the config's target epsilon"),
):
    """White-box self-check of DP-SGD: Dirac gradient canaries in one real training run.

    Exit 0 when the empirical epsilon lower bound is below the accountant's epsilon, 1 when it is
    above (the implementation leaks more than it claims).
    """
    # opacus, timm, torch: loaded where this runs, so importing memlens.cli stays light
    from memlens.audit.dp_selfcheck import selfcheck as run_selfcheck

    cfg = load_yaml(TrainConfig, config, overrides=_overrides({"dp.epsilon": dp_epsilon}))
    r = run_selfcheck(cfg, m=m, seed=seed, cache_dir=_cache_dir())
    if out is not None:
        write_json(out / "selfcheck.json", r.to_dict())
    lb = r.lower_bound
    typer.echo(f"{r.m} gradient canaries ({r.n_in} included), {r.steps} steps at sample rate {r.sample_rate:.4f}, "
               f"noise multiplier {r.noise_multiplier:.4f}")
    typer.echo(f"canary AUC {r.auc:.3f}; epsilon lower bound {lb['epsilon']:.3f} (Gaussian f-DP), "
               f"{r.lower_bound_other['epsilon']:.3f} (one-run), accountant epsilon {r.claimed_epsilon:.3f}")
    typer.echo(("PASSED: " if r.passed else "FAILED: ") + r.message)
    raise typer.Exit(0 if r.passed else 1)


command(selfcheck, on=dp_app)


# ----------------------------------------------------------------------------- sweep


@command
def sweep(
    config: Path = typer.Argument(..., help="sweep YAML (train:, epsilons:, dp:, extra_seeds:)"),
    out: Path = typer.Option(..., "--out", "-o", help="sweep directory"),
    force: bool = typer.Option(False, "--force", help="delete the sweep directory and start again"),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="runs trained at once, each in its own process with "
                                                          "its share of the CPU threads (not under torchrun)"),
):
    """Train f and g at every epsilon of a sweep (finished runs are skipped, interrupted ones resumed)."""
    # opacus, timm, torch: loaded where this runs, so importing memlens.cli stays light
    from memlens.dp.sweep import run_sweep

    cfg = load_yaml(SweepConfig, config)
    console = _console()

    def on_run(run, what):
        console.print(f"[bold]{run.name}[/]: {what}", highlight=False)

    def on_epoch(info):
        eps = f"  epsilon {info.extra['epsilon']}" if "epsilon" in info.extra else ""
        console.print(f"  epoch {info.epoch}/{info.epochs}  loss {info.loss:.4f}{eps}", highlight=False)

    check_writable(out, what="sweep directory")
    with _writer(out):
        results = run_sweep(cfg, out, force=force, cache_dir=_cache_dir(), on_run=on_run, on_epoch=on_epoch,
                            jobs=jobs)
    for run, what in results:
        if what.startswith("skipped"):
            console.print(f"{run.name}: {what}", highlight=False)
    console.print(f"sweep complete: {out} ({len(results)} runs)", highlight=False)


# ----------------------------------------------------------------------------- audit


def _encoder_specs(side: str, models: list[str], weights: list[str], common: dict[str, Any], *,
                   allow_random_init: bool = False) -> list[dict]:
    """--f/--g values with their --f-weights/--g-weights, paired in order among timm:/py: specs: one
    weights file per timm:/py: encoder (or --allow-random-init for those without)."""
    external = [m for m in models if m.startswith(("timm:", "py:"))]
    if len(weights) > len(external) or (len(weights) < len(external) and not allow_random_init):
        raise MemlensError(f"{len(weights)} --{side}-weights for {len(external)} timm:/py: --{side} encoder(s): give "
                           f"one weights file per encoder, in order (or --allow-random-init to audit the encoders "
                           f"without one at their random initialisation)")
    out, k = [], 0
    for m in models:
        spec: dict[str, Any] = {"model": m}
        if m.startswith(("timm:", "py:")):
            spec["weights"] = weights[k] if k < len(weights) else "none"
            k += 1
            spec.update({key: v for key, v in common.items() if v is not None})
        out.append(spec)
    return out


def _writer(out: Path):
    """One writer per output folder: process 0 holds its lock (the others write nothing)."""

    # torch: loaded where this runs, so importing memlens.cli stays light
    from memlens import distributed as dist

    return output_lock(out) if dist.is_main() else contextlib.nullcontext()


def check_writable(path: Path, *, what: str) -> None:

    _check(path, what=what)


def _signing_key(path: Optional[Path]):
    """The private key to sign with: --sign-key, else $MEMLENS_SIGNING_KEY, else none."""

    chosen = path or (Path(os.environ["MEMLENS_SIGNING_KEY"]) if os.environ.get("MEMLENS_SIGNING_KEY") else None)
    return load_private_key(chosen) if chosen else None


def _expand_runs(values: list[str]) -> list[str]:
    """Run directories, each value a path or a glob (quoted, so the shell leaves it to memlens)."""

    out = []
    for v in values:
        if any(ch in v for ch in "*?["):
            found = sorted(p for p in glob.glob(v) if Path(p).is_dir())
            if not found:
                raise MemlensError(f"--references '{v}' matches no run directory")
            out += found
        else:
            out.append(v)
    return out


def _json_option(value: Optional[str], name: str) -> Optional[dict]:

    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise MemlensError(f"{name} must be a JSON object, e.g. '{{\"img_size\": 32}}': {exc.msg}") from None
    if not isinstance(parsed, dict):
        raise MemlensError(f"{name} must be a JSON object, e.g. '{{\"img_size\": 32}}'")
    return parsed


@command
def audit(
    out: Path = typer.Option(..., "--out", "-o", help="audit directory to write"),
    f: list[str] = typer.Option([], "--f", help="encoder trained on S_S+S_C: a run directory, timm:<model> or "
                                               "py:<module>:<factory> (repeat for more seeds)"),
    g: list[str] = typer.Option([], "--g", help="encoder trained on S_S+S_I (repeat for more seeds)"),
    f_weights: list[str] = typer.Option([], "--f-weights", help="weights of each timm:/py: --f, in order"),
    g_weights: list[str] = typer.Option([], "--g-weights", help="weights of each timm:/py: --g, in order"),
    references: list[str] = typer.Option([], "--references", help="reference encoders of a K-reference design: "
                                                                  "memlens runs (repeat, or a quoted glob: "
                                                                  "'runs/ref-*'), or timm:/py: with "
                                                                  "--reference-weights and --design, in the order of "
                                                                  "the design's lists"),
    reference_weights: list[str] = typer.Option([], "--reference-weights", help="weights of each timm:/py: "
                                                                                "--references, in order"),
    design: Optional[str] = typer.Option(None, "--design", help="the design (memlens design) that references trained "
                                                                "outside memlens followed"),
    target: Optional[str] = typer.Option(None, "--target", help="the encoder to be released (a memlens run, or "
                                                               "timm:/py: with --target-weights): its per-image "
                                                               "membership scores, calibrated by the references"),
    target_weights: Optional[str] = typer.Option(None, "--target-weights", help="weights of a timm:/py: --target"),
    canaries_dir: Optional[str] = typer.Option(None, "--canaries", help="the canary set the encoders trained with "
                                                                        "(default: the one memlens runs recorded)"),
    model_kwargs: Optional[str] = typer.Option(None, "--model-kwargs", help="JSON kwargs of timm:/py: models, "
                                                                            "e.g. '{\"img_size\": 32}'"),
    key_prefix: Optional[str] = typer.Option(None, "--key-prefix", help="checkpoint key prefix to select and strip"),
    no_strict: bool = typer.Option(False, "--no-strict", help="load weights even with missing/unexpected keys"),
    allow_random_init: bool = typer.Option(False, "--allow-random-init", help="audit timm:/py: encoders without "
                                                                             "--*-weights at their random "
                                                                             "initialisation (the gate fails them)"),
    representation: Optional[str] = typer.Option(None, help="pooled, cls, mean, features, output or layer:NAME"),
    input_size: Optional[int] = typer.Option(None, help="input side of timm:/py: models (default: timm's data "
                                                        "config)"),
    mean: Optional[str] = typer.Option(None, help="input normalisation mean of timm:/py: models, e.g. 0.5,0.5,0.5"),
    std: Optional[str] = typer.Option(None, help="input normalisation std of timm:/py: models"),
    layers: list[str] = typer.Option([], "--layers", help="layers to hook (shell glob on module paths; repeat)"),
    splits: Optional[str] = typer.Option(None, help="splits.json"),
    data: Optional[str] = typer.Option(None, "--data", help="the images: folder, archive, .npz or manifest .csv"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="audit YAML (flags override it)"),
    augment: Optional[str] = typer.Option(None, help="augmentation set of the views (default: training set)"),
    views: Optional[str] = typer.Option(None, help="views per point, or 'auto' (until the ranking is reliable)"),
    pairing: Optional[str] = typer.Option(None, help="all pairs of views (default) or disjoint pairs"),
    distance: Optional[str] = typer.Option(None, help="l2, l1, cosine or angular"),
    max_per_subset: Optional[int] = typer.Option(None, help="score at most this many points per subset"),
    batch_points: Optional[int] = typer.Option(None, help="points per forward batch"),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N or mps"),
    precision: Optional[str] = typer.Option(None, help="fp32, bf16 or fp16 (forward passes)"),
    workers: Optional[str] = typer.Option(None, help="DataLoader workers decoding images, or 'auto'"),
    threads: Optional[str] = typer.Option(None, help="intra-op threads, or 'auto' (this process's share of the "
                                                     "cores minus its workers)"),
    seed: Optional[int] = typer.Option(None),
    force: bool = typer.Option(False, "--force", help="overwrite an existing audit"),
    sign_key: Optional[Path] = typer.Option(None, "--sign-key", help="Ed25519 private key (PEM) signing audit.json "
                                                                     "(default: $MEMLENS_SIGNING_KEY)"),
):
    """Measure memorization: SSLMem per point, LayerMem per layer, UnitMem per unit, and the tests."""
    # torch: imported by the commands that train or score, not by gate, report or card
    from memlens.audit.api import data_config_for_path

    over = _overrides({**_audit_encoders(f=f, g=g, f_weights=f_weights, g_weights=g_weights, references=references,
                                         reference_weights=reference_weights, target=target,
                                         target_weights=target_weights, model_kwargs=model_kwargs,
                                         key_prefix=key_prefix, no_strict=no_strict, input_size=input_size, mean=mean,
                                         std=std, allow_random_init=allow_random_init),
                       "design": design, "canaries": canaries_dir,
                       "splits": splits, "augment": augment, "pairing": pairing,
                       "views": (views if views == "auto" else _int_option(views, "--views")) if views else None,
                       "distance": distance, "max_per_subset": max_per_subset, "seed": seed,
                       "batch_points": batch_points, "device": device, "precision": precision,
                       "workers": _count_option(workers, "--workers"), "threads": _count_option(threads, "--threads"),
                       "representation": representation, "layers": layers or None,
                       "data": data_config_for_path(data).model_dump() if data else None})
    cfg = load_yaml(AuditConfig, config, overrides=over) if config else validate(
        AuditConfig, deep_update({}, over), source="options")
    _audit_into(cfg, out, force=force, key=_signing_key(sign_key))


def _audit_into(cfg: AuditConfig, out: Path, *, force: bool, key) -> None:
    """Run the audit with a progress bar and write it (process 0), then print its headline findings."""
    # torch and timm: imported by the commands that train or score, not by gate, report or card
    from memlens import distributed as dist
    from memlens.audit.engine import run_audit
    from memlens.device import resolve_device

    if out.exists() and any(out.iterdir()) and not force:
        raise MemlensError(f"{out} already holds {'an audit' if (out / 'audit.json').exists() else 'other files'}; "
                           f"pass --force to overwrite it")
    check_writable(out, what="audit directory")
    main = dist.is_main()
    if main and cfg.device == "auto":
        typer.echo(f"device: {resolve_device('auto')} (auto)", err=True)
    # rich: optional or slow to import, loaded only on this path
    from rich.progress import Progress

    with _writer(out), Progress(transient=True, disable=not main) as bar:
        task = bar.add_task("scoring points", total=None)
        result = run_audit(cfg, cache_dir=_cache_dir(),
                           progress=lambda stage, done, total: bar.update(task, completed=done, total=total))
        if not main:
            return
        if out.exists() and any(out.iterdir()) and not force:  # written meanwhile by someone else
            raise MemlensError(f"{out} was written by another process during this audit; pass --force to replace it")
        write_audit(result, out, force=force, sign_key=key)
    typer.echo("\n".join(audit_lines(result.summary, out)))


def _audit_encoders(*, f, g, f_weights, g_weights, references, reference_weights, target, target_weights,
                    model_kwargs, key_prefix, no_strict, input_size, mean, std, allow_random_init) -> dict[str, Any]:
    """The encoder specs of ``memlens audit``'s options (f and g, or references and a target)."""
    common = {"kwargs": _json_option(model_kwargs, "--model-kwargs"), "key_prefix": key_prefix,
              "strict": False if no_strict else None, "input_size": input_size,
              "mean": _floats(mean, "--mean"), "std": _floats(std, "--std")}

    def specs(side: str, models: list[str], weights: list[str]) -> list | None:
        return _encoder_specs(side, models, weights, common, allow_random_init=allow_random_init) if models else None

    return {"f": specs("f", f, f_weights), "g": specs("g", g, g_weights),
            "references": specs("reference", _expand_runs(references) if references else [], reference_weights),
            "target": specs("target", [target], [target_weights] if target_weights else [])[0] if target else None}


def _floats(value: Optional[str], name: str) -> Optional[list[float]]:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise MemlensError(f"{name} must be comma-separated numbers, e.g. 0.5,0.5,0.5; got '{value}'") from None


def _count_option(value: Optional[str], name: str) -> int | str | None:
    if value is None or value == "auto":
        return value
    count = _int_option(value, name)
    if count < 0:
        raise MemlensError(f"{name} must be 'auto' or a number >= 0, got '{value}'")
    return count


def _int_option(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise MemlensError(f"{name} must be a whole number or 'auto', got '{value}'") from None


@command
def layers(
    model: str = typer.Argument(..., help="a run directory, timm:<model> or py:<module>:<factory>"),
    weights: Optional[str] = typer.Option(None, "--weights", help="weights file (timm:/py:)"),
    model_kwargs: Optional[str] = typer.Option(None, "--model-kwargs", help="JSON kwargs of the model"),
    select: list[str] = typer.Option([], "--layers", help="keep only these layers (shell globs; repeat)"),
    input_size: Optional[int] = typer.Option(None, help="input side, when the model does not say"),
):
    """List the layers an audit would hook, with their kind and number of units."""
    # timm, torch: loaded where this runs, so importing memlens.cli stays light
    from memlens.audit.encoders import resolve

    # Listing layers reads the architecture only: a timm:/py: spec without weights is fine here.
    if weights is None and (model.startswith("timm:") or model.startswith("py:")):
        weights = "none"
    spec = validate(EncoderSpec, _overrides({"model": model, "weights": weights, "input_size": input_size,
                                             "kwargs": _json_option(model_kwargs, "--model-kwargs")}), source="options")
    enc = resolve(spec)
    specs = enc.discover(select or None)
    typer.echo(f"{enc.label}: input {enc.in_chans}x{enc.input_size}x{enc.input_size}, representation "
               f"{enc.representation}, {len(specs)} layers")
    typer.echo(f"{'layer':<32} {'kind':<14} {'units':>7}  UnitMem by default")
    for s in specs:
        typer.echo(f"{s.name:<32} {s.kind:<14} {s.units:>7}  "
                   f"{'yes (' + s.unit_kind + ')' if s.is_unit_layer else 'no (signed output)'}")
    unit_total = sum(s.units for s in specs if s.is_unit_layer)
    typer.echo(f"{sum(s.is_unit_layer for s in specs)} unit layers, {unit_total:,} units")


@command
def export(
    run_dir: Path = typer.Argument(..., help="a memlens run directory"),
    to: Path = typer.Option(..., "--to", help=".safetensors file to write"),
    force: bool = typer.Option(False, "--force", help="overwrite --to"),
):
    """Export a run's encoder as plain safetensors for timm (ViTs) or a py: factory (ResNets)."""

    # timm, torch: loaded where this runs, so importing memlens.cli stays light
    from memlens.train.export import export_run

    check_writable(to, what="weights file")
    if to.exists() and not force:
        raise MemlensError(f"{to} already exists; pass --force to overwrite it")
    spec = export_run(run_dir, to)
    typer.echo(f"wrote {to}; audit it as:")
    typer.echo("  " + json.dumps(spec))


@command
def design(
    out: Path = typer.Option(..., "--out", "-o", help="directory to write the design into"),
    splits: Path = typer.Option(..., "--splits", help="splits.json"),
    k: int = typer.Option(..., "--k", help="number of reference encoders (even: pairs)"),
    seed: int = typer.Option(0, "--seed", help="seed of the halves and of the canaries' coins"),
    pool: str = typer.Option("S_C,S_I", "--pool", help="subsets the references split in halves"),
    canaries_dir: Optional[Path] = typer.Option(None, "--canaries", help="a canary set (memlens canaries) to plant"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing design"),
):
    """Write a K-reference design for a training loop of your own: one image list per reference.

    ref-NN.txt lists the images reference NN trains on (ids: for folder data, paths relative to the
    folder), ref-NN.canaries.txt its canaries; train reference NN on those with your own code, then
    memlens audit --design DIR --references ... (in the order of the lists) checks and audits them.
    """
    # torch: loaded where this runs, so importing memlens.cli stays light
    from memlens.data import Splits

    if (out / DESIGN_FILE).exists() and not force:
        raise MemlensError(f"{out / DESIGN_FILE} already exists; pass --force to overwrite it")
    check_writable(out / DESIGN_FILE, what="design")
    cfg = validate(ReferencesConfig, {"k": k, "seed": seed, "pool": [p.strip() for p in pool.split(",")]},
                   source="options")
    raw = read_json(splits, what="splits file")
    try:
        parsed = Splits.model_validate(raw)
    except Exception as exc:  # noqa: BLE001 - pydantic's message, on one line
        raise MemlensError(f"{splits} is not a memlens splits file: {str(exc).splitlines()[0]}") from None
    canary_ids, digest = [], None
    if canaries_dir is not None:

        cset = load_canaries(canaries_dir)
        canary_ids, digest = list(cset.ids), cset.manifest.sha256
    design = ReferenceDesign(k=cfg.k, seed=cfg.seed, pool=tuple(cfg.pool))
    path = write_design_files(parsed, splits, canary_ids, design, out, canaries_sha256=digest)
    typer.echo(f"wrote {path} and {cfg.k} image lists (ref-00.txt ... ref-{cfg.k - 1:02d}.txt): train reference i on "
               f"ref-i.txt (and ref-i.canaries.txt), references 2j and 2j+1 with one seed; then memlens audit "
               f"--design {out} --references ...")


@command
def canaries(
    out: Path = typer.Option(..., "--out", "-o", help="canary set directory to write"),
    splits: Optional[Path] = typer.Option(None, help="splits.json: its data, and the images marked canaries must "
                                                     "not be made from"),
    source: Optional[str] = typer.Option(None, help="data source, without --splits"),
    data_path: Optional[str] = typer.Option(None, "--data", help="data path, without --splits"),
    m: int = typer.Option(200, "--m", help="number of canaries"),
    kinds: str = typer.Option("natural", help="natural, synthetic and/or marked"),
    seed: int = typer.Option(0),
    p_include: float = typer.Option(0.5, help="probability that a canary joins f's training data"),
    force: bool = typer.Option(False, "--force"),
):
    """Make a canary set: atypical images, each drawn into f's training data with probability 1/2.

    Train f with it (canaries: DIR in the training YAML); the audit then reports canary
    membership inference and an empirical epsilon lower bound.
    """
    # timm, torch: loaded where this runs, so importing memlens.cli stays light
    from memlens.audit.api import data_config_for_path
    from memlens.data import Splits, load

    if out.exists() and any(out.iterdir()) and not force:
        raise MemlensError(f"{out} already holds files; pass --force to overwrite it")
    check_writable(out, what="canary set directory")
    c = validate(CanaryConfig, {"m": m, "kinds": [k.strip() for k in kinds.split(",") if k.strip()], "seed": seed,
                                "p_include": p_include}, source="options")
    exclude: set[str] = set()
    if splits is not None:
        raw = read_json(splits, what="splits file")
        if not raw.get("data"):
            raise MemlensError(f"{splits} records no data source; give --source/--data instead")
        data = validate(DataConfig, raw["data"], source=f"{splits}: data")
        dataset = load(data, cache_dir=_cache_dir())
        sp = Splits.load(splits, dataset)
        exclude = set(sp.ids("S_S", "S_C", "S_I", "S_E"))
    else:
        data = data_config_for_path(data_path) if data_path else DataConfig(source=source or "digits")
        dataset = load(data, cache_dir=_cache_dir())
    cset = make_canaries(dataset, m=c.m, kinds=list(c.kinds), seed=c.seed, p_include=c.p_include,
                         exclude_ids=exclude)
    save_canaries(cset, out)
    typer.echo(f"wrote {out}: {c.m} canaries ({', '.join(c.kinds)}), {len(cset.membership().included)} drawn into f's "
               f"training data; sha256 {cset.manifest.sha256[:16]}")


@command
def keygen(
    out: Path = typer.Option(..., "--out", "-o", help="private key file to write (PEM, mode 0600)"),
):
    """Make an Ed25519 key pair for signing audits; prints the public key to put in a policy."""

    if out.exists():
        raise MemlensError(f"{out} already exists; a key is never overwritten")
    try:
        public = generate_key(out)
    except OSError as exc:
        raise MemlensError(f"cannot write {out}: {exc.strerror or exc}") from None
    typer.echo(f"wrote {out} (keep it secret: it signs audits)")
    typer.echo(f"public key: {public}")
    typer.echo(f"policy: rules: {{require_signature: {{public_key: \"{public}\"}}}}")


# ----------------------------------------------------------------------------- report


@command
def report(
    audits: list[Path] = typer.Argument(..., help="audit directories (several epsilons of one dataset are compared)"),
    out: Path = typer.Option(..., "--out", "-o", help="PDF to write"),
    html: Optional[Path] = typer.Option(None, "--html", help="also write the HTML"),
    policy: Optional[Path] = typer.Option(None, "--policy", help="policy file: adds the verdict"),
    redact: bool = typer.Option(False, "--redact", help="replace image thumbnails by placeholders"),
    title: Optional[str] = typer.Option(None, help="report title"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="the previous release's audit: adds a "
                                                                      "comparison section"),
):
    """Render the HTML and PDF compliance report of one or more audits."""

    pol = load_policy(policy) if policy else None
    for path, what in ((out, "report"), (html, "HTML report")):
        if path is not None:
            check_writable(path, what=what)
    r = render_report(audits, out_pdf=out, out_html=html, policy=pol, redact=redact, title=title,
                      cache_dir=_cache_dir(), baseline=baseline)
    typer.echo(f"wrote {out} ({r.pages} pages)" + (f" and {html}" if html else "")
               + ("" if r.gate is None else f"; policy {r.gate.policy}: {'PASSED' if r.gate.passed else 'FAILED'}"))


# ----------------------------------------------------------------------------- gate


@command
def gate(
    audits: list[Path] = typer.Argument(..., help="audit directories"),
    policy: Path = typer.Option(..., "--policy", help="policy YAML"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="the previous release's audit directory "
                                                                      "(overrides the policy's baseline.path)"),
    control: list[Path] = typer.Option([], "--control", help="an audit serving as positive control for "
                                                             "require_power (e.g. the non-private reference)"),
    junit: Optional[Path] = typer.Option(None, "--junit", help="write JUnit XML (one test case per rule)"),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="write a Markdown summary"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the verdict as JSON"),
    weights: list[Path] = typer.Option([], "--weights", help="the weight file being released (repeat): an audit "
                                                             "passes only if it audited these very weights"),
):
    """Check audits against a policy: exit 0 if every rule passes, 1 if any fails, 2 on bad input."""
    # rich: optional or slow to import, loaded only on this path
    from rich.table import Table


    pol = load_policy(policy)
    # every output checked before the verdict: a passing gate must never exit 1 for want of a file
    for path, what in ((junit, "JUnit report"), (markdown, "Markdown summary"), (json_out, "JSON verdict")):
        if path is not None:
            check_writable(path, what=what)
    base_path = baseline or (Path(pol.baseline.path) if pol.baseline and pol.baseline.path else None)
    base = read_audit(base_path) if base_path else None
    if base is not None and pol.baseline is None:

        pol = pol.model_copy(update={"baseline": Baseline()})
    defaulted = False
    if base is not None and not pol.baseline.max_increase.model_dump(exclude_none=True):

        pol = pol.model_copy(update={"baseline": pol.baseline.model_copy(update={"max_increase": DEFAULT_INCREASES})})
        defaulted = True

    for w in weights:
        if not w.is_file():
            raise MemlensError(f"--weights: {w} is not a file")
    result = evaluate(pol, [read_audit(a) for a in audits], controls=[read_audit(c) for c in control], baseline=base,
                      weights_sha256=[sha256_file(w) for w in weights])
    table = Table(title=f"memlens gate: policy {pol.name}")
    for col in ("audit", "rule", "threshold", "observed", "result"):
        table.add_column(col)
    for r in result.results:
        table.add_row(r.audit, r.rule, r.threshold, r.observed, "[green]pass[/]" if r.passed else "[red]FAIL[/]")
    console = _console()
    console.print(table)
    for r in result.results:
        if not r.passed and r.detail:
            console.print(f"[red]{r.audit}[/]: {r.detail}", highlight=False)
    if defaulted:
        console.print("note: the policy has no baseline.max_increase rules; --baseline applied the defaults "
                      "(membership AUC +0.02, empirical epsilon +0.25, mean candidate score +0.01): set "
                      "baseline.max_increase in the policy to choose others", highlight=False)
    if junit:
        to_junit(result, junit)
    if markdown:
        write_markdown(result, markdown)
    if json_out:
        write_json(json_out, {"policy": result.policy, "passed": result.passed, "verdicts": result.verdicts(),
                              "results": [r.to_dict() for r in result.results]})
    verdicts = result.verdicts()
    if len(verdicts) > 1:
        for a, ok in verdicts.items():
            console.print(f"  {a}: {'[green]passed[/]' if ok else '[red]FAILED[/]'}", highlight=False)
    console.print("[bold green]PASSED[/]" if result.passed else "[bold red]FAILED[/]")
    raise typer.Exit(result.exit_code)


@command
def card(
    audits: list[Path] = typer.Argument(..., help="audit directories"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="markdown file to write (default: print)"),
    policy: Optional[Path] = typer.Option(None, "--policy", help="policy: adds the gate's verdict"),
    report: Optional[Path] = typer.Option(None, "--report", help="the compliance report PDF: its sha256 is cited"),
):
    """Write the "Privacy and memorization" section of a model card from verified audits."""

    if report is not None and not report.is_file():
        raise MemlensError(f"report not found: {report}")
    if out is not None:
        check_writable(out, what="model card")
    text = write_card(audits, out, policy=load_policy(policy) if policy else None, report=report)
    if out is None:
        typer.echo(text, nl=False)
    else:
        typer.echo(f"wrote {out}")


# ----------------------------------------------------------------------------- run


@command
def run(
    config: Path = typer.Argument(..., help="pipeline YAML"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory"),
    force: bool = typer.Option(False, "--force", help="delete the output directory and start again"),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="encoders trained at once, each in its own process "
                                                          "with its share of the CPU threads (not under torchrun)"),
    sign_key: Optional[Path] = typer.Option(None, "--sign-key", help="Ed25519 private key (PEM) signing every run "
                                                                     "record and audit (default: "
                                                                     "$MEMLENS_SIGNING_KEY)"),
    no_fail_on_gate: bool = typer.Option(False, "--no-fail-on-gate", help="exit 0 even when the policy gate fails "
                                                                          "(default: exit 1, as memlens gate)"),
):
    """Split, train f and g per epsilon, probe, audit, report and gate, in one resumable command.

    Exits as memlens gate does: 0 when the gate passes (or the pipeline has no policy), 1 when it fails,
    2 on bad input.
    """
    # rich: optional or slow to import, loaded only on this path
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    # opacus, timm, torch: loaded where this runs, so importing memlens.cli stays light
    from memlens.pipeline import run_pipeline

    cfg = load_yaml(PipelineConfig, config).resolved(config.parent)  # paths relative to the pipeline file
    check_writable(out, what="pipeline directory")
    key_path = sign_key or (Path(os.environ["MEMLENS_SIGNING_KEY"]) if os.environ.get("MEMLENS_SIGNING_KEY")
                            else None)
    key = _signing_key(key_path)  # refused now, before any work, if it is not a key
    console = _console()
    if key is not None:
        console.print(f"signing run records and audits with {key_path} (public key "
                      f"{public_key_text(key)[:16]}...)", highlight=False)
    with Progress(TextColumn("{task.description:<22}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        with _writer(out):
            result = run_pipeline(cfg, out, force=force, cache_dir=_cache_dir(), progress=progress,
                                  log=lambda msg: console.print(msg, highlight=False, soft_wrap=True), jobs=jobs,
                                  sign_key=key_path, log_detail=console.is_terminal)
    console.print(f"\n[bold]pipeline complete[/] in {result.seconds:.0f} s: {out}", highlight=False)
    for stage, status in result.stages.items():
        console.print(f"  {stage:<7} {status}", highlight=False)
    console.print("files:", highlight=False)
    for f in result.files:
        console.print(f"  {f}", highlight=False)
    if result.gate_passed is not None:
        console.print(f"gate: {'[green]PASSED[/]' if result.gate_passed else '[red]FAILED[/]'} (details: "
                      f"{out / 'gate.md'})")
    if result.gate_exit and not no_fail_on_gate:
        raise typer.Exit(result.gate_exit)


def _init_distributed() -> bool:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, Gloo on CPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    # torch: loaded where this runs, so importing memlens.cli stays light
    import torch
    import torch.distributed as td

    if td.is_initialized():
        return False
    cuda = torch.cuda.is_available() and os.environ.get("MEMLENS_BACKEND", "") != "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    td.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def main() -> None:

    # WeasyPrint and fontTools log font-subsetting notices at WARNING; they are not the user's concern.
    for name in ("weasyprint", "fontTools"):
        logging.getLogger(name).setLevel(logging.ERROR)
    started = _init_distributed()
    try:
        app()
    finally:
        if started:
            # torch: loaded where this runs, so importing memlens.cli stays light
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()


if __name__ == "__main__":
    main()
