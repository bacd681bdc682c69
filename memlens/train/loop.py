"""One training loop for every objective and every gradient step: cosine schedule with warm-up,
AdamW or SGD, per-epoch checkpoints and exact resume.

Every random draw of epoch ``e`` (shuffling, augmentation, masking, DP sampling and noise)
comes from generators seeded by ``(seed, e)``, so a run resumed from the checkpoint of epoch
``e`` continues with the same draws an uninterrupted run makes, and ends with the same weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
import torch
import torch.nn as nn

from memlens import distributed as D
from memlens import resources
from memlens.config import TrainConfig
from memlens.data import Augmenter, Dataset, Splits, load
from memlens.data.augment import EvalTransform
from memlens.data.canaries import canary_labels, load_canaries
from memlens.data.dataset import ConcatPixels, Pixels
from memlens.data.loader import mode_for
from memlens.data.references import ReferenceDesign, membership_digest, reference_members
from memlens.data.splits import side_subsets
from memlens.device import describe_device, resolve_device
from memlens.errors import MemlensError
from memlens.io import prepare_output_dir, sha256_file
from memlens.models import build_encoder, parameter_count
from memlens.resources import ResourcePlan
from memlens.rng import derive_seed
from memlens.train.average import WeightAverage
from memlens.train.objectives import Objective, build_objective
from memlens.train.run import (
    CHECKPOINT_FILE,
    HEADS_FILE,
    MODEL_FILE,
    RUN_FILE,
    RunRecord,
    load_checkpoint,
    now,
    read_run,
    save_checkpoint,
    save_heads,
    save_weights,
    versions,
    write_run,
)
from memlens.train.step import Diverged, PlainStep, Reading, Step


@dataclass
class Prepared:
    """The data a run trains on, resolved once."""

    dataset: Dataset
    splits: Splits | None
    splits_path: str | None
    subsets: tuple[str, ...]
    rows: np.ndarray
    pixels: Pixels  # the dataset's images, then the canaries' (rows index both)
    labels: torch.Tensor | None
    mean: list[float]
    std: list[float]
    canaries: dict | None = None
    reading: Reading | None = None
    reference: dict | None = None


def prepare(config: TrainConfig, *, cache_dir: str | Path | None = None, dataset: Dataset | None = None) -> Prepared:
    dataset = dataset if dataset is not None else load(config.data, cache_dir=cache_dir, collective=D.active())
    splits = Splits.load(config.splits, dataset) if config.splits else None
    cset = None
    if config.canaries:

        cset = load_canaries(config.canaries, dataset=dataset)
    reference = None
    if config.reference is not None:
        rows, canary_rows, reference = _reference_rows(config, splits, dataset, cset)
        subsets: tuple[str, ...] = ("reference",)
    else:
        rows, subsets = _side_rows(config, splits, dataset)
        # Canaries join the side that trains on the candidates (f); g, the reference, never sees one.
        canary_rows = cset.member_rows() if cset is not None and "S_C" in subsets else np.zeros(0, dtype=np.int64)
    if len(rows) < 2:
        raise MemlensError("fewer than two training images selected")
    mean, std = dataset.normalization()
    pixels, labels = dataset.pixels, dataset.labels
    canaries = None
    if cset is not None:
        n = len(dataset)
        pixels = ConcatPixels([pixels, cset.pixels])
        if labels is not None:  # a supervised canary gets a random class: a mislabelled, atypical point

            labels = np.concatenate([labels, canary_labels(cset, len(dataset.class_names))])
        rows = np.concatenate([rows, n + canary_rows])
        canaries = {"path": str(Path(config.canaries).resolve()), "sha256": cset.manifest.sha256,
                    "membership_sha256": sha256_file(Path(config.canaries) / "membership.json"),
                    "m": len(cset), "members_trained": int(len(canary_rows)),
                    "membership": "the reference design's coins" if reference else "membership.json"}
    return Prepared(dataset=dataset, splits=splits, splits_path=config.splits, subsets=subsets, rows=rows,
                    pixels=pixels, labels=torch.from_numpy(labels) if labels is not None else None,
                    mean=mean, std=std, canaries=canaries, reference=reference)


def _side_rows(config: TrainConfig, splits: Splits | None, dataset: Dataset) -> tuple[np.ndarray, tuple[str, ...]]:
    """The rows of a classic side (f, g, all or a list of subsets)."""
    if splits is not None:
        subsets = side_subsets(config.subsets)
        if not subsets:
            return dataset.part_indices("train"), subsets
        return np.sort(dataset.indices(splits.ids(*subsets))), subsets
    if config.subsets != "all":
        raise MemlensError(f"subsets '{config.subsets}' needs a splits file (set splits: or use subsets: all)")
    return dataset.part_indices("train"), ()


def _reference_rows(config: TrainConfig, splits: Splits, dataset: Dataset, cset) -> tuple[np.ndarray, np.ndarray,
                                                                                          dict]:
    """The rows of reference i of a K-reference design (memlens.data.references), and its record."""

    r = config.reference
    design = ReferenceDesign(k=r.k, seed=r.seed, pool=tuple(r.pool))
    canary_ids = list(cset.ids) if cset is not None else []
    images, canaries = reference_members(splits, canary_ids, design, r.index)
    rows = np.sort(dataset.indices(images))
    index = {c: k for k, c in enumerate(canary_ids)}
    canary_rows = np.array(sorted(index[c] for c in canaries), dtype=np.int64)
    record = {"index": r.index, "k": r.k, "pair": design.pair_of(r.index), "seed": r.seed, "pool": list(r.pool),
              "design": r.design, "images": len(images), "canaries": len(canaries),
              "membership_sha256": membership_digest(images, canaries)}
    return rows, canary_rows, record


def make_optimizer(config: TrainConfig, objective: Objective) -> torch.optim.Optimizer:
    params = (objective.trainable_parameters() if hasattr(objective, "trainable_parameters")
              else [p for p in objective.parameters() if p.requires_grad])
    ids = {id(p) for p in params}
    # No weight decay on biases, norms and token embeddings (1-d or (1, T, D) parameters).
    decay, no_decay = [], []
    for name, p in objective.named_parameters():
        if id(p) not in ids:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token.weight", "pos_embed.weight", "mask_token.weight"))
         else decay).append(p)
    o = config.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=(0.9, 0.95))
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)


@dataclass
class EpochInfo:
    epoch: int
    epochs: int
    loss: float
    lr: float
    seconds: float
    images_per_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    record: RunRecord


def _representation_dim(encoder: nn.Module, channels: int, size: int) -> int:
    was_training = encoder.training
    with torch.no_grad():
        dim = encoder.eval().representation(torch.zeros(2, channels, size, size)).shape[1]
    encoder.train(was_training)
    return int(dim)


def input_size_for(config: TrainConfig, dataset: Dataset) -> int:
    """Side of the encoder's square input: ``model.input_size``, else the data's size when every
    image has one square size, else timm's default for the model (224 for memlens's own ViTs)."""
    if config.model.input_size:
        return config.model.input_size
    if dataset.square_size is not None:
        return dataset.square_size
    if config.model.arch.startswith("timm:"):

        cfg = timm.models.get_pretrained_cfg(config.model.arch[5:])
        size = getattr(cfg, "input_size", None) if cfg is not None else None
        if size:
            return int(size[-1])
    return 224


# torchvision's and timm's default eval crop for images of their own sizes
EVAL_CROP_PCT = 0.875


def _record(config: TrainConfig, prepared: Prepared, encoder: nn.Module, device: torch.device, *,
            input_size: int, resources: ResourcePlan) -> RunRecord:
    ds = prepared.dataset
    splits = None
    if prepared.splits is not None:
        splits = {"path": str(Path(prepared.splits_path).resolve()), "hash": prepared.splits.hash,
                  "side": ("reference" if prepared.reference else
                           config.subsets if isinstance(config.subsets, str) else None),
                  "subsets": list(prepared.subsets)}
    resolved = config.model_copy(update={"augment": config.augmentation})
    warnings = []
    if prepared.labels is not None and config.framework == "supervised":
        classes = int(torch.unique(prepared.labels[torch.from_numpy(prepared.rows)]).numel())
        if classes < 2:
            warnings.append("the training images all have one class: a supervised encoder learns nothing "
                            "(its loss is 0 from the start)")
    evaluation = None if prepared.reading.mode == "dense" else {
        "crop_pct": EVAL_CROP_PCT, "crop_mode": "center", "interpolation": "bilinear"}
    return RunRecord(
        status="running", config=resolved,
        data={**ds.describe(), "image_size": input_size, "channels": ds.channels,
              "normalize": {"mean": prepared.mean, "std": prepared.std}, "eval_transform": evaluation},
        splits=splits, train_points=len(prepared.rows),
        model={"arch": config.model.arch, "family": encoder.family, "parameters": parameter_count(encoder),
               "representation_dim": _representation_dim(encoder, ds.channels, input_size),
               "layers": len(encoder.layer_specs())},
        environment={"device": describe_device(device),
                     "precision": "fp32 (DP-SGD)" if config.dp is not None else config.precision,
                     "world_size": D.world_size(),
                     "backend": D.backend(), "resources": resources.to_dict()},
        canaries=prepared.canaries, reference=prepared.reference,
        warnings=warnings, versions=versions(), created=now(), updated=now())


StepFactory = Callable[..., Step]


@dataclass
class _Built:
    encoder: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    step: Step
    input_size: int
    average: WeightAverage | None = None


def _build(config: TrainConfig, prepared: Prepared, device: torch.device, resources: ResourcePlan,
           step_factory: StepFactory | None) -> _Built:
    """The encoder, its objective and optimizer, how the images are read, and the gradient step."""
    ds = prepared.dataset
    torch.manual_seed(derive_seed(config.seed, "init"))
    m = config.model
    size = input_size_for(config, ds)
    encoder = build_encoder(m.arch, image_size=size, in_chans=ds.channels, patch_size=m.patch_size,
                            embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio)
    augmenter = Augmenter(config.augmentation, mean=prepared.mean, std=prepared.std, size=size,
                          eval_transform=EvalTransform(size, crop_pct=EVAL_CROP_PCT))
    num_classes = len(ds.class_names) if ds.class_names else None
    objective = build_objective(config, encoder, augmenter, in_chans=ds.channels, num_classes=num_classes)
    if D.active() and _has_batchnorm(objective):
        objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
        encoder = objective.encoder
    objective.to(device)
    mode = mode_for(prepared.pixels, augmented=True)
    prepared.reading = Reading(prepared.pixels, mode, augmenter.geometry(objective.views_per_example)
                               if mode == "cut" else None, resources.workers, config.data.on_bad_image, augmenter)
    optimizer = make_optimizer(config, objective)
    step = (step_factory or PlainStep)(config, objective, optimizer, prepared, device)
    average = WeightAverage(config.optim.average_epochs, config.epochs) if config.optim.average_epochs else None
    return _Built(encoder, objective, optimizer, step, size, average)


def _check_start(config: TrainConfig | None, out: Path, *, resume: bool, force: bool,
                 step_factory: StepFactory | None) -> tuple[TrainConfig, RunRecord | None]:
    """The config to train and the record to continue (resume), or a refusal naming the reason."""
    record = None
    if resume and (out / RUN_FILE).is_file():
        record = read_run(out)
        if config is not None and config.model_copy(update={"augment": config.augmentation}) != record.config:
            raise MemlensError(f"{out} was started with a different config; use --force to start it again")
        config = record.config
        if record.status == "failed":
            raise MemlensError(f"{out} failed ({record.message}); resuming would fail again: change the config and "
                               f"start again with --force")
    if config is None:
        raise MemlensError(f"nothing to resume in {out} (no {RUN_FILE})")
    if config.dp is not None and step_factory is None:
        raise MemlensError("this config has a dp section: DP-SGD training is memlens.dp.training.train_encoder "
                           "(the command line and sweeps call it)")
    if not resume and not force and out.is_dir() and any(out.iterdir()):
        what = "a previous output" if (out / RUN_FILE).exists() else "other files"
        raise MemlensError(f"{out} already holds {what}; pass --force to overwrite it or --resume to continue it")
    return config, record


def train_loop(config: TrainConfig | None, out_dir: str | Path, *, resume: bool = False, force: bool = False,
               cache_dir: str | Path | None = None, on_epoch: Callable[[EpochInfo], None] | None = None,
               dataset: Dataset | None = None, step_factory: StepFactory | None = None) -> TrainResult:
    """Train an encoder and write a run directory.

    One loop for every objective and every kind of step: ``step_factory(config, objective,
    optimizer, prepared, device)`` builds the gradient step (default :class:`PlainStep`; DP-SGD's
    comes from :func:`memlens.dp.training.train_encoder`). Under ``torch.distributed`` every process
    runs this function; process 0 alone writes the run directory.

    Args:
        config: the training settings (None with ``resume``: use the run's own).
        out_dir: the run directory.
        resume: continue an interrupted run from its last checkpoint (with any world size).
        force: delete an existing run in ``out_dir`` first.
        cache_dir: data cache directory.
        on_epoch: called after every epoch (progress display).
        dataset: the already-loaded data (skips loading; must match ``config.data``).
        step_factory: builds the gradient step.

    Raises:
        MemlensError: bad settings, a run already in ``out_dir``, or a checkpoint that does not
            match the config. A run whose loss diverges is marked ``failed`` before the error.
    """
    out = Path(out_dir)
    config, record = _check_start(config, out, resume=resume, force=force, step_factory=step_factory)
    if record is not None and record.status in ("complete", "stopped_budget"):
        return TrainResult(out, record)
    device = resolve_device(config.device)
    # Everything that can refuse the config runs before the output directory is touched.
    prepared = prepare(config, cache_dir=cache_dir, dataset=dataset)
    if D.world_size() > config.batch_size:
        raise MemlensError(f"batch_size {config.batch_size} is smaller than the {D.world_size()} processes")
    plan = resources.plan(lazy=not prepared.pixels.in_memory, workers=config.workers, threads=config.threads,
                          processes_per_node=D.local_world_size())
    with resources.using(plan):
        built = _build(config, prepared, device, plan, step_factory)
        if config.batch_size > len(prepared.rows):
            # a batch larger than the data trains on one partial batch per epoch: another recipe than asked for
            raise MemlensError(f"batch_size {config.batch_size} exceeds the {len(prepared.rows)} training images; "
                               f"lower it to at most {len(prepared.rows)}")
        if D.is_main():
            prepare_output_dir(out, force=force, resume=resume, marker=RUN_FILE)
        D.barrier()
        record, start_epoch, step = _open_record(out, config, prepared, built, device, plan, record)
        _epochs(out, config, built, record, start_epoch=start_epoch, step=step, on_epoch=on_epoch)
    return TrainResult(out, record)


def _open_record(out: Path, config: TrainConfig, prepared: Prepared, built: _Built, device: torch.device,
                 plan: ResourcePlan, record: RunRecord | None) -> tuple[RunRecord, int, int]:
    """A new run record, or the resumed one with the checkpoint's weights, optimizer and loop state."""
    start_epoch, step = 0, 0
    if record is None:
        record = _record(config, prepared, built.encoder, device, input_size=built.input_size, resources=plan)
        record.dp = built.step.record()
    elif (out / CHECKPOINT_FILE).is_file():
        state = load_checkpoint(out / CHECKPOINT_FILE, objective=built.objective, optimizer=built.optimizer,
                                device=device)
        start_epoch, step = state["epoch"], state["step"]
        built.step.restore_loop_state(state.get("loop", {}))
        if built.average is not None:
            built.average.restore(state.get("average", {}), state.get("extra", {}))
        record.history = record.history[:start_epoch]
        record.epochs_done = start_epoch
        record.environment = {**record.environment, "world_size": D.world_size(), "backend": D.backend(),
                              "device": describe_device(device), "resources": plan.to_dict()}
    else:
        record.history, record.epochs_done = [], 0
    record.status = "running"
    if D.is_main():
        write_run(out, record)
    return record, start_epoch, step


def _epochs(out: Path, config: TrainConfig, built: _Built, record: RunRecord, *, start_epoch: int, step: int,
            on_epoch: Callable[[EpochInfo], None] | None) -> None:
    """The epochs, a checkpoint and record after each, and the final weights."""
    main = D.is_main()
    step_obj, objective, optimizer = built.step, built.objective, built.optimizer
    objective.train()
    wall0 = time.perf_counter() - record.wall_seconds
    try:
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            loss_sum, seen = 0.0, 0
            for batch in step_obj.batches(epoch):
                if step_obj.budget_exhausted:
                    break
                step_obj.set_lr(step)
                stats = step_obj.apply(batch, epoch, step)
                step += 1
                objective.after_step(step / step_obj.total_steps)
                loss_sum += stats.loss_sum
                seen += stats.examples
            seconds = time.perf_counter() - t0
            extra = step_obj.epoch_extra(epoch=epoch + 1,
                                         last=epoch + 1 == config.epochs or step_obj.budget_exhausted)
            info = EpochInfo(epoch=epoch + 1, epochs=config.epochs,
                             loss=loss_sum / seen if seen else float("nan"),
                             lr=optimizer.param_groups[0]["lr"], seconds=seconds,
                             images_per_s=seen / max(seconds, 1e-9), extra=extra)
            record.history.append({"epoch": info.epoch, "loss": round(info.loss, 6), "lr": info.lr,
                                   "seconds": round(seconds, 3), "images_per_s": round(info.images_per_s, 1),
                                   "steps": step, **extra})
            record.epochs_done = epoch + 1
            record.wall_seconds = round(time.perf_counter() - wall0, 3)
            record.dp = step_obj.record()
            _record_skipped(record, step_obj)
            average = built.average
            if average is not None and average.wants(epoch):
                average.update(objective)
            if main:
                save_checkpoint(out / CHECKPOINT_FILE, objective=objective, optimizer=optimizer,
                                state={"epoch": epoch + 1, "step": step, "loop": step_obj.loop_state(),
                                       **({"average": average.state()} if average is not None else {})},
                                extra=average.tensors() if average is not None else None)
                write_run(out, record)
            D.barrier()
            if on_epoch and main:
                on_epoch(info)
            if step_obj.budget_exhausted:
                record.status = "stopped_budget"
                record.message = step_obj.budget_message
                break
    except KeyboardInterrupt:
        record.status = "interrupted"
        record.dp = step_obj.record(exact=True)
        if main:
            write_run(out, record)
        raise
    except Diverged as exc:
        record.status = "failed"
        record.message = (f"{exc}; lower optim.lr (now {config.optim.lr:g}) or check the data, then start again "
                          f"with --force")
        if main:
            write_run(out, record)
        raise MemlensError(f"{out}: {record.message}") from None
    rates = [h["images_per_s"] for h in record.history]
    record.images_per_s = round(float(np.mean(rates)), 1) if rates else None
    if record.status != "stopped_budget":
        record.status = "complete"
    record.wall_seconds = round(time.perf_counter() - wall0, 3)
    if built.average is not None and built.average.count:
        built.average.apply(objective)  # post-processing of weights the run produced (DP unchanged)
        record.averaged_epochs = built.average.count
    if main:
        save_weights(out / MODEL_FILE, built.encoder, metadata={"arch": config.model.arch,
                                                                "format": "memlens-encoder-1"})
        record.model_sha256 = sha256_file(out / MODEL_FILE)
        save_heads(out / HEADS_FILE, objective)
        write_run(out, record)
        (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    D.barrier()


def _record_skipped(record: RunRecord, step_obj: Step) -> None:
    """Images left out while reading (``on_bad_image: skip``), from every process, in the record."""
    seen = {}
    for part in D.all_gather_object(step_obj.skipped):
        seen.update(part)
    if not seen:
        return
    known = {s["id"] for s in record.data.get("skipped", [])}
    extra = [{"id": i, "problem": why, "when": "read"} for i, why in sorted(seen.items()) if i not in known]
    if extra:
        record.data = {**record.data, "skipped": [*record.data.get("skipped", []), *extra]}


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
