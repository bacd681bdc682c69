"""The per-encoder signals behind every number of an audit: ``signals.parquet`` beside points.csv.

One row per (encoder, scored point), long format:

==================  =====================================================================
column              meaning
==================  =====================================================================
encoder             the encoder's label (as in audit.json ``encoders``)
encoder_index       its position among the audited encoders (f..., g... / references, target)
role                f, g, ref or target
id                  the point's id (canaries: their canary id)
subset              S_S, S_C, S_I, S_E or canary
member              the encoder trained on the point (the membership matrix)
control             a control image of the null (same membership in every scored encoder)
align               mean distance between the point's views (SSLMem paper, Eq. 1; lower = better aligned)
loss                the encoder's training loss on the point (per-example objectives), else NaN
layer:<name>        the same alignment at layer <name> (the points LayerMem measures; NaN elsewhere)
==================  =====================================================================

From these columns every per-image estimate of points.csv can be recomputed: centre each encoder's
``align`` (or ``loss``) on its control rows, take out - in per pair (:mod:`memlens.audit.inference`),
and rank against the control rows scored under the same membership (:mod:`memlens.audit.nulls`).
:func:`matrix` gives the (E, n) arrays those functions take.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from memlens.io import sha256_file

SIGNALS_FILE = "signals.parquet"


def signals_table(*, labels: list[str], roles: list[str], ids: list[str], subset_of: np.ndarray,
                  member: np.ndarray, controls: np.ndarray, align: np.ndarray, losses: np.ndarray | None,
                  layers: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """The long table (see the module docstring).

    Args:
        labels, roles: (E,) the encoders.
        ids, subset_of: (n,) the points.
        member: (E, n) bool membership; controls: (n,) bool.
        align: (E, n) alignments; losses: (E, n) or None.
        layers: layer name -> (E, n) per-layer alignment (NaN where not measured).
    """
    e, n = align.shape
    table = {"encoder": np.repeat(np.asarray(labels, dtype=object), n),
             "encoder_index": np.repeat(np.arange(e), n),
             "role": np.repeat(np.asarray(roles, dtype=object), n),
             "id": np.tile(np.asarray(ids, dtype=object), e),
             "subset": np.tile(np.asarray(subset_of, dtype=object), e),
             "member": member.reshape(-1).astype(bool),
             "control": np.tile(np.asarray(controls, bool), e),
             "align": align.reshape(-1).astype(np.float64),
             "loss": (losses.reshape(-1).astype(np.float64) if losses is not None else np.full(e * n, np.nan))}
    for name, values in (layers or {}).items():
        table[f"layer:{name}"] = values.reshape(-1).astype(np.float64)
    return pd.DataFrame(table)


def write_signals(table: pd.DataFrame, path: Path) -> str:
    """Write the table as parquet (pyarrow); returns its sha256."""
    table.to_parquet(path, index=False)
    return sha256_file(path)


def matrix(signals: pd.DataFrame, column: str, *, ids: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(values (E, n), member (E, n)) of one column, encoders in their audit order, points in the order
    of ``ids`` (default: the table's own order)."""
    wide = signals.pivot(index="encoder_index", columns="id", values=column)
    mem = signals.pivot(index="encoder_index", columns="id", values="member")
    order = ids if ids is not None else list(dict.fromkeys(signals["id"]))
    return wide[order].to_numpy(np.float64), mem[order].to_numpy(bool)
