"""The release gate in CI: baselines, the GitHub Actions recipe run step by step, the model card,
audit integrity and file modes."""

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from memlens.audit import read_audit, run_audit, write_audit
from memlens.cli import app
from memlens.config import AuditConfig, SplitConfig, SplitSizes, TrainConfig
from memlens.data import make_splits
from memlens.dp.training import train_encoder
from memlens.errors import MemlensError
from memlens.policy import evaluate, load_policy

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
runner = CliRunner()
RECIPE = {"framework": "mae", "epochs": 1, "batch_size": 64, "model": {"arch": "vit_micro", "depth": 1,
                                                                       "embed_dim": 16, "num_heads": 2},
          "mae": {"decoder_dim": 16}}


@pytest.fixture(scope="module")
def releases(tmp_path_factory, digits):
    """Two releases of one recipe (seeds 0 and 1) audited on the same splits, and their run dirs."""
    root = tmp_path_factory.mktemp("releases")
    make_splits(digits, SplitConfig(sizes=SplitSizes(S_S=100, S_C=40, S_I=40, S_E=40), seed=2)).save(
        root / "s.json")
    audits = {}
    for seed in (0, 1):
        for side in ("f", "g"):
            cfg = TrainConfig.model_validate({**RECIPE, "splits": str(root / "s.json"), "subsets": side,
                                              "seed": seed})
            train_encoder(cfg, root / f"r{seed}" / side, dataset=digits)
        res = run_audit(AuditConfig(f=[str(root / f"r{seed}" / "f")], g=[str(root / f"r{seed}" / "g")],
                                    splits=str(root / "s.json"), views=4, bootstrap=200,
                                    reliability={"bootstrap": 20}), dataset=digits)
        audits[seed] = write_audit(res, root / f"audit{seed}")
    mean = {s: read_audit(a).points.query("subset == 'S_C'")["sslmem_sym_norm"].mean() for s, a in audits.items()}
    high, low = sorted(audits, key=lambda s: -mean[s])
    return root, audits, high, low


def _policy(path, body):
    path.write_text(body)
    return path


BASELINE_POLICY = """version: 1
name: release
rules:
  max_point_score: 1.0
baseline:
  at_risk_score: 0.0
  max_increase: {mean_candidate_score: 0.0, at_risk_count: 0}
"""


def test_gate_with_a_baseline(releases, tmp_path):
    root, audits, high, low = releases
    pol = load_policy(_policy(tmp_path / "p.yaml", BASELINE_POLICY))
    worse = evaluate(pol, [read_audit(audits[high])], baseline=read_audit(audits[low]))
    failed = {r.rule for r in worse.results if not r.passed}
    assert "baseline.mean_candidate_score" in failed and not worse.passed
    better = evaluate(pol, [read_audit(audits[low])], baseline=read_audit(audits[high]))
    assert better.passed, [r for r in better.results if not r.passed]
    code = runner.invoke(app, ["gate", str(audits[high]), "--policy", str(tmp_path / "p.yaml"), "--baseline",
                               str(audits[low])]).exit_code
    assert code == 1
    # a baseline of other splits is refused, naming the problem
    odir = tmp_path / "other"
    res = run_audit(AuditConfig(f=[str(root / "r0" / "f")], g=[str(root / "r0" / "g")], splits=str(root / "s.json"),
                                views=4, bootstrap=200, reliability={"bootstrap": 20}))
    res.summary.splits["hash"] = "0" * 64  # as if audited on other splits
    write_audit(res, odir)
    r = runner.invoke(app, ["gate", str(audits[low]), "--policy", str(tmp_path / "p.yaml"), "--baseline", str(odir)])
    assert r.exit_code == 2 and "used other splits" in r.stderr


def _run_workflow(recipe: Path, env: dict, workdir: Path) -> tuple[int, list[str]]:
    """Run a GitHub Actions job's shell steps as the runner would: in order, stopping at a failure
    except for steps marked ``if: always()``; ``uses:`` steps and the install step are skipped (memlens is
    already installed here)."""
    job = next(iter(yaml.safe_load(recipe.read_text())["jobs"].values()))
    failed, ran = False, []
    for step in job["steps"]:
        if "uses" in step or step.get("id") == "install":
            continue
        if failed and "always()" not in str(step.get("if", "")):
            continue
        r = subprocess.run(["bash", "-eo", "pipefail", "-c", step["run"]], cwd=workdir, env=env,
                           capture_output=True, text=True, timeout=600)
        ran.append(f"{step['name']}: {r.returncode}")
        if r.returncode != 0:
            failed = True
            if r.returncode == 2:
                raise AssertionError(f"{step['name']} refused its input: {r.stderr}")
    return (1 if failed else 0), ran


@pytest.mark.slow
def test_github_actions_recipe_runs_on_two_releases(releases, tmp_path):
    root, audits, high, low = releases
    policy = _policy(tmp_path / "release.yaml", BASELINE_POLICY)
    recipe = ROOT / "docs" / "ci" / "github-actions.yml"
    for current, baseline, expected in ((high, low, 1), (low, high, 0)):
        work = tmp_path / f"job{current}"
        work.mkdir()
        summary = work / "summary.md"
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "F_ENCODER": str(root / f"r{current}" / "f"),
               "G_ENCODER": str(root / f"r{current}" / "g"), "SPLITS": str(root / "s.json"), "POLICY": str(policy),
               "BASELINE": str(audits[baseline]), "OUT": "memlens-out", "GITHUB_STEP_SUMMARY": str(summary)}
        code, ran = _run_workflow(recipe, env, work)
        assert code == expected, ran
        out = work / "memlens-out"
        for name in ("report.pdf", "report.html", "gate.xml", "gate.md", "gate.json", "model-card-privacy.md"):
            assert (out / name).is_file(), name  # the artifacts exist even when the gate failed
        text = summary.read_text()
        assert ("memlens gate: FAILED" if expected else "memlens gate: PASSED") in text
        assert "&gt;" not in text and "&lt;" not in text and "| baseline.mean_candidate_score |" in text
        assert "Compared with the previous release" in (out / "report.html").read_text()
    assert "Privacy and memorization" in (tmp_path / f"job{low}" / "memlens-out" / "model-card-privacy.md").read_text()


def test_model_card(releases, tmp_path):
    root, audits, high, low = releases
    r = runner.invoke(app, ["card", str(audits[low]), "--policy", str(ROOT / "policies" / "default.yaml")])
    assert r.exit_code == 0, r.stderr
    text = r.stdout
    assert text.startswith("## Privacy and memorization")
    assert "Trained **without** differential privacy" in text and read_audit(audits[low]).sha256 in text
    assert "Release gate (policy `default`): **FAILED**" in text and "require_power" in text


def test_tampered_tables_are_refused(releases, tmp_path):
    root, audits, high, low = releases
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in Path(audits[high]).iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    pts = pd.read_csv(copy / "points.csv")
    top = pts[pts.subset == "S_C"].sort_values("sslmem_sym_norm", ascending=False).head(6).index
    pts.drop(index=top).to_csv(copy / "points.csv", index=False, float_format="%.6g")
    policy = str(ROOT / "policies" / "default.yaml")
    for cmd in (["gate", str(copy), "--policy", policy], ["report", str(copy), "--out", str(tmp_path / "r.pdf")],
                ["card", str(copy)]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 2 and "points.csv was modified or replaced after audit.json recorded it" in r.stderr, cmd
    assert not (tmp_path / "r.pdf").exists()
    # a truncated copy written with the right hash but fewer rows would still need audit.json edited:
    # editing audit.json changes its sha256, which reports and model cards print
    (copy / "points.csv").write_bytes((Path(audits[high]) / "points.csv").read_bytes())
    assert read_audit(copy).sha256 == read_audit(audits[high]).sha256


def test_written_files_respect_the_umask(releases, tmp_path):
    root, audits, high, low = releases
    old = os.umask(0o022)
    try:
        r = runner.invoke(app, ["report", str(audits[low]), "--out", str(tmp_path / "r.pdf"), "--html",
                                str(tmp_path / "r.html")])
        assert r.exit_code == 0, r.stderr
        runner.invoke(app, ["gate", str(audits[low]), "--policy", str(ROOT / "policies" / "default.yaml"),
                            "--junit", str(tmp_path / "j.xml"), "--markdown", str(tmp_path / "g.md")])
        files = [tmp_path / n for n in ("r.pdf", "r.html", "j.xml", "g.md")]
        files += list(Path(audits[low]).iterdir()) + list((root / "r0" / "f").iterdir())
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, (f, oct(f.stat().st_mode))
        assert stat.S_IMODE(Path(audits[low]).stat().st_mode) == 0o755
    finally:
        os.umask(old)


def test_markdown_reads_as_plain_text(releases, tmp_path):
    from memlens.policy.gate import to_markdown

    root, audits, high, low = releases
    gate = evaluate(load_policy(ROOT / "policies" / "default.yaml"), [read_audit(audits[low])])
    text = to_markdown(gate)
    assert "&gt;" not in text and "&lt;" not in text and re.search(r"\| ≤ 0\.6 \|", text)


def test_policy_baseline_path_and_unknown_baseline(releases, tmp_path):
    root, audits, high, low = releases
    body = BASELINE_POLICY.replace("  at_risk_score: 0.0", f"  path: {audits[low]}\n  at_risk_score: 0.0")
    pol = _policy(tmp_path / "withpath.yaml", body)
    r = runner.invoke(app, ["gate", str(audits[high]), "--policy", str(pol)])
    assert r.exit_code == 1 and "since the previous release" in r.stdout
    r = runner.invoke(app, ["gate", str(audits[high]), "--policy", str(pol), "--baseline", str(tmp_path / "none")])
    assert r.exit_code == 2 and "audit directory not found" in r.stderr
    with pytest.raises(MemlensError, match="max_increase.auc: unknown key; did you mean"):
        load_policy(_policy(tmp_path / "typo.yaml", "version: 1\nrules: {max_point_score: 1}\n"
                                                    "baseline: {max_increase: {auc: 0.1}}\n"))


def test_dockerfile_pins_the_makefiles_torch():
    make = (ROOT / "Makefile").read_text()
    docker = (ROOT / "Dockerfile").read_text()
    torch_pin = re.search(r"^TORCH := torch==(\S+) torchvision==(\S+)$", make.split("else")[1], re.M)
    assert torch_pin, "the Makefile's x86_64 torch pin"
    assert f"ARG TORCH_VERSION={torch_pin.group(1)}" in docker
    assert f"ARG TORCHVISION_VERSION={torch_pin.group(2)}" in docker
    assert re.search(r"^USER 10001$", docker, re.M) and "MEMLENS_CACHE_DIR=/out/cache" in docker
