"""The README's "Audit your own encoder" section, run exactly as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {re.escape(marker)}:[^>]*-->\s*```[a-z]*\n(.*?)```", text, re.S)
    assert m, f"README block {marker} not found"
    return m.group(1)


def _run_block(marker: str, tmp_path, timeout: int) -> tuple[Path, dict, subprocess.CompletedProcess]:
    """Run a README shell block as written, in a folder laid out like the project (venv, examples, policies)."""
    work = tmp_path / "clone"
    work.mkdir()
    venv = Path(sys.executable).parents[1]
    for name, target in ((".venv", venv), ("examples", ROOT / "examples"), ("policies", ROOT / "policies")):
        (work / name).symlink_to(target)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "-eo", "pipefail", "-c", _block(marker)], cwd=work, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return work, env, r


def test_audit_your_own_encoder_section_runs_as_written(tmp_path):
    work, env, r = _run_block("own-encoder", tmp_path, 600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ex = work / "example"
    assert (ex / "splits.json").is_file() and (ex / "splits.manifest.csv").is_file()
    assert (ex / "audit" / "audit.json").is_file() and (ex / "report.pdf").stat().st_size > 10000
    assert "blocks.1.mlp.act" in r.stdout and "S_C: mean SSLMem" in r.stdout
    r = subprocess.run([str(work / ".venv" / "bin" / "python"), "-c", _block("own-encoder-python")], cwd=ex,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (ex / "audit-api" / "audit.json").is_file() and "layermem" in r.stdout


def test_references_from_your_own_trainer_section_runs_as_written(tmp_path):
    work, _, r = _run_block("own-references", tmp_path, 900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ex = work / "refs-example"
    assert sorted(p.name for p in (ex / "design").glob("ref-*.txt") if "canaries" not in p.name) == [
        f"ref-{i:02d}.txt" for i in range(4)]
    from memlens.audit import read_audit

    a = read_audit(ex / "audit")
    assert a.summary.design["kind"] == "references" and a.summary.design["pairs"] == 2
    assert a.summary.design["target"] and a.points["target_member"].any()
    assert "require_weights" in (ex / "gate.md").read_text() and "memorized at" not in r.stderr
