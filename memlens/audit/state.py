"""What one audit carries from step to step: the setup (points, membership, the passes' context), what
the passes measured, the per-image estimates and the membership findings. :mod:`memlens.audit.engine`
fills them in; :mod:`memlens.audit.assemble` turns them into the tables and the record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from memlens import resources
from memlens.audit import inference
from memlens.audit.design import Design, Points
from memlens.audit.passes import PassContext
from memlens.audit.reliability import Reliability
from memlens.config import AuditConfig
from memlens.data.augment import Augmenter
from memlens.data.dataset import Dataset
from memlens.data.splits import Splits


@dataclass
class Setup:
    """The audit's inputs once planned: settings, design, points, controls and the passes' context."""

    cfg: AuditConfig
    design: Design
    splits: Splits
    dataset: Dataset
    points: Points
    cset: Any
    ctx: PassContext
    augmenter: Augmenter
    unit_augmenter: Augmenter
    aug_name: str
    unit_aug_name: str
    eligible: np.ndarray  # natural points in the FDR family (with an in- and an out-encoder)
    unreadable: list[dict]
    plan: resources.ResourcePlan
    warnings: list[str]
    controls: np.ndarray  # natural points with the same membership in every scored encoder (the null's)
    timings: dict = field(default_factory=dict)


@dataclass
class UnitNull:
    """Each unit's permutation p-value against its own UnitMem on non-members (layer -> (U,))."""

    p: dict[str, np.ndarray]
    members: int
    non_members: int
    permutations: int
    alpha: float


@dataclass
class Estimates:
    """Per-image memorization of every point, and how reliable its ranking is."""

    per_image: inference.PerImage
    encoders: inference.EncoderReliability | None
    view_var: np.ndarray
    loss_per_image: inference.PerImage | None = None
    loss_encoders: inference.EncoderReliability | None = None
    controls: np.ndarray | None = None  # (n,) bool, the control images of the null


@dataclass
class Measured:
    """What the passes measured (engine: the scoring, units, loss and Top/Least passes)."""

    scoring: dict[str, Any]  # dist (E, n, V, V), layer (E, L, n), the units' accumulators
    align: np.ndarray  # (E, n) alignment loss (SSLMem paper, Eq. 1)
    losses: np.ndarray | None  # (E, n) per-example training loss, or None
    loss_name: str | None
    reliability: Reliability  # of the ranking over views
    topk_freq: np.ndarray  # (n,) how often each eligible image stays in the top k over view resamples
    n_views: int
    unit_acc: dict
    class_acc: dict
    unit_views: int
    unit_null: UnitNull | None
    groups: dict  # the Top and Least memorized images and their units' responses (localizing paper, Table 11)


@dataclass
class Findings:
    """Membership inference and empirical privacy (:func:`memlens.audit.membership.membership_findings`)."""

    canary_table: pd.DataFrame | None
    privacy: dict | None
    attacks: list
