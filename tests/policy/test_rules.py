"""Gate rules that read the audit record's calibration facts, on real audits."""

import copy

import pytest
from conftest import small_train_config

from memlens.audit.engine import run_audit
from memlens.audit.results import read_audit, write_audit
from memlens.config import AuditConfig, SplitConfig, SplitSizes
from memlens.data.splits import make_splits
from memlens.dp.training import train_encoder
from memlens.policy.gate import evaluate
from memlens.policy.registry import RULES
from memlens.policy.schema import Policy


@pytest.fixture(scope="module")
def audits(tmp_path_factory, digits):
    """A pair trained on disjoint candidates, audited with its controls (80 in both encoders, 40 in
    neither), and again with 10 images per subset (too few controls to check the null on)."""
    root = tmp_path_factory.mktemp("rules")
    make_splits(digits, SplitConfig(sizes=SplitSizes(S_S=80, S_C=40, S_I=40, S_E=40), seed=3)).save(root / "s.json")
    for k, side in enumerate(("f", "g")):
        train_encoder(small_train_config(seed=k, splits=str(root / "s.json"), subsets=side, epochs=2), root / side,
                      dataset=digits)
    common = {"f": [str(root / "f")], "g": [str(root / "g")], "splits": str(root / "s.json"), "views": 4,
              "augment": "mae"}
    full = write_audit(run_audit(AuditConfig(**common), dataset=digits), root / "full")
    few = write_audit(run_audit(AuditConfig(**common, max_per_subset=10), dataset=digits), root / "few")
    return read_audit(full), read_audit(few)


def _rows(audit, rule="require_calibrated_null"):
    policy = Policy.model_validate({"rules": {rule: True}})
    return [r for r in evaluate(policy, [audit]).results if r.rule == rule]


def test_require_calibrated_null_is_registered_and_in_the_schema():
    rules = Policy.model_fields["rules"].annotation
    assert "require_calibrated_null" in RULES and "require_calibrated_null" in rules.model_fields


def test_require_calibrated_null_passes_a_checked_null(audits):
    full, _ = audits
    (row,) = _rows(full)
    null = full.summary.inference["null"]
    # independently: the self-check counted 120 controls (80 + 40) and passed, on both measures
    assert null["self_check"]["n"] == 120 and null["self_check"]["passed"]
    assert full.summary.loss_memorization["inference"]["null"]["self_check"]["passed"]
    assert row.passed and row.observed.startswith("alignment: ") and "; loss: " in row.observed
    assert f"{null['self_check']['below_05']:.1%} of 120 below 0.05" in row.observed


def test_require_calibrated_null_fails_an_unchecked_null(audits):
    _, few = audits
    (row,) = _rows(few)
    assert few.summary.inference["null"]["self_check"] is None  # 10 controls of each kind: below the 20 needed
    assert not row.passed and "not checkable" in row.observed and "needs at least 20" in row.detail


def test_require_calibrated_null_fails_a_withheld_list(audits):
    full = copy.copy(audits[0])
    why = "the control images in every encoder and those in none disagree"
    null = full.summary.inference.null
    failed = null.model_copy(update={"self_check": null.self_check.model_copy(update={"passed": False}),
                                     "withheld": why})
    full.summary = full.summary.model_copy(update={"inference": full.summary.inference.model_copy(
        update={"null": failed})})
    (row,) = _rows(full)
    assert not row.passed and why in row.detail
    # off unless the policy asks for it
    other = evaluate(Policy.model_validate({"rules": {"max_point_score": 1.0}}), [full]).results
    assert [r.rule for r in other] == ["max_point_score"]
