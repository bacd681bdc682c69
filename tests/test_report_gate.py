"""Reports (HTML/PDF read back), policies, the gate, the one-command pipeline and the Dockerfile."""

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import run
from pypdf import PdfReader

from memlens.audit import read_audit, run_audit, write_audit
from memlens.config import AuditConfig, SplitConfig, SplitSizes, TrainConfig
from memlens.data import load, make_splits
from memlens.errors import MemlensError
from memlens.policy import load_policy
from memlens.reports import render_report
from memlens.train import train_loop

ROOT = Path(__file__).resolve().parents[1]
EVIL = "<b>bold</b> & <script>x</script>"



@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory):
    """A real micro audit of data whose class names and ids contain markup."""
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (160, 8, 8, 3), dtype=np.uint8)
    ids = np.array([f"img-{i:03d}" if i % 7 else f"img<i>{i}</i>" for i in range(160)])
    np.savez(root / "d.npz", x=x, y=np.arange(160) % 2, class_names=np.array([EVIL, "plain"]), ids=ids)
    data = {"source": "npz", "path": str(root / "d.npz")}
    ds = load(**data)
    make_splits(ds, SplitConfig(sizes=SplitSizes(S_S=80, S_C=24, S_I=24, S_E=24))).save(root / "s.json")
    recipe = {"framework": "mae", "data": data, "splits": str(root / "s.json"), "epochs": 1, "batch_size": 32,
              "model": {"arch": "vit_micro", "depth": 1, "embed_dim": 16, "num_heads": 2}, "mae": {"decoder_dim": 16}}
    for side in ("f", "g"):
        train_loop(TrainConfig.model_validate({**recipe, "subsets": side}), root / side, dataset=ds)
    res = run_audit(AuditConfig(f=[str(root / "f")], g=[str(root / "g")], splits=str(root / "s.json"), views=4,
                                bootstrap=200, top_k=5), dataset=ds)
    return write_audit(res, root / "audit")


def _text(pdf):
    return "\n".join(page.extract_text() for page in PdfReader(pdf).pages)


def test_pdf_reads_back_with_sections_and_headline_numbers(audit_dir, tmp_path):
    r = render_report([audit_dir], out_pdf=tmp_path / "r.pdf", out_html=tmp_path / "r.html",
                      policy=load_policy(ROOT / "policies" / "default.yaml"))
    reader = PdfReader(tmp_path / "r.pdf")
    assert len(reader.pages) == r.pages >= 4
    text = _text(tmp_path / "r.pdf")
    for title in ("Setup and provenance", "SSLMem: memorization of individual images", "Statistical tests",
                  "Where the memorization is: layers and units", "Method notes and limitations", "Policy checks"):
        assert title in text
    summary = json.loads((audit_dir / "audit.json").read_text())
    sc = summary["subsets"]["S_C"]
    assert f"{sc['mean']:+.4f}" in text and f"{sc['ci_low']:+.4f}" in text
    assert summary["data"]["fingerprint"] in text.replace("\n", "")
    assert re.search(r"Page 1 of \d+", text)
    assert "FAILED" in text or "PASSED" in text


def test_data_derived_text_is_escaped(audit_dir, tmp_path):
    render_report([audit_dir], out_pdf=None, out_html=tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "<script>x</script>" not in html and "<b>bold</b>" not in html
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &lt;script&gt;x&lt;/script&gt;" in html
    assert "<i>7</i>" not in html  # ids are data too
    assert "img&lt;i&gt;" in html or "img-" in html


def test_redact_leaves_no_image_of_the_data(audit_dir, tmp_path):
    render_report([audit_dir], out_pdf=tmp_path / "open.pdf")
    render_report([audit_dir], out_pdf=tmp_path / "red.pdf", redact=True)
    count = lambda p: sum(len(page.images) for page in PdfReader(p).pages)  # noqa: E731
    assert count(tmp_path / "open.pdf") > 0
    assert count(tmp_path / "red.pdf") == 0
    assert "redacted" in _text(tmp_path / "red.pdf")


def test_epsilon_comparison_needs_several_audits(audit_dir, tmp_path):
    html = tmp_path / "two.html"
    render_report([audit_dir, audit_dir], out_pdf=None, out_html=html)
    assert "Privacy levels compared" in html.read_text()
    render_report([audit_dir], out_pdf=None, out_html=tmp_path / "one.html")
    assert "Privacy levels compared" not in (tmp_path / "one.html").read_text()


def _policy(tmp_path, name, body):
    p = tmp_path / f"{name}.yaml"
    p.write_text(body)
    return p


def test_gate_exit_codes_junit_and_markdown(audit_dir, tmp_path):
    loose = _policy(tmp_path, "loose", "version: 1\nname: loose\nrules:\n"
                                      "  max_mean_candidate_score: 1.0\n  max_point_score: 1.0\n"
                                      "  max_fraction_units_above: {level: 0.5, fraction: 1.0}\n")
    code, out, _ = run("gate", "--policy", loose, audit_dir, "--junit", tmp_path / "j.xml", "--markdown",
                       tmp_path / "g.md")
    assert code == 0 and "PASSED" in out
    suite = ET.parse(tmp_path / "j.xml").getroot()
    cases = suite.findall("testcase")
    assert len(cases) == 3 and suite.get("failures") == "0"
    assert {c.get("name") for c in cases} == {"max_mean_candidate_score", "max_point_score",
                                             "max_fraction_units_above"}
    assert "memlens gate: PASSED" in (tmp_path / "g.md").read_text()

    code, out, _ = run("gate", "--policy", ROOT / "policies" / "strict.yaml", audit_dir, "--junit", tmp_path / "s.xml")
    assert code == 1 and "FAILED" in out
    suite = ET.parse(tmp_path / "s.xml").getroot()
    failed = {c.get("name") for c in suite.findall("testcase") if c.find("failure") is not None}
    assert "require_dp" in failed  # a non-private encoder never passes the strict policy
    # without canaries there is no positive control and no empirical epsilon: both fail, named
    assert {"require_power", "max_empirical_epsilon"} <= failed
    # one case per rule (empirical_within_claimed needs a claim and a bound; this audit has neither)
    assert {c.get("name") for c in suite.findall("testcase")} == {
        "require_dp", "require_power", "max_membership_auc", "max_tpr_at_fpr", "max_empirical_epsilon",
        "max_mean_candidate_score", "max_fraction_candidates_above", "max_point_score", "require_calibrated_null",
        "max_fraction_units_above"}


def test_gate_bad_input_is_exit_2(audit_dir, tmp_path):
    policy = ROOT / "policies" / "default.yaml"
    code, _, err = run("gate", "--policy", policy, tmp_path / "nowhere")
    assert code == 2 and "audit directory not found" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in audit_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "audit.json").write_text('{"kind": "memlens-audit", "version": 1, "created": 3}')
    code, _, err = run("gate", "--policy", policy, broken)
    assert code == 2 and "audit.json" in err and len(err.strip().splitlines()) == 1
    (broken / "audit.json").write_text("not json")
    assert run("gate", "--policy", policy, broken)[0] == 2
    bad = _policy(tmp_path, "bad", "version: 1\nrules:\n  max_mean_score: 0.1\n")
    code, _, err = run("gate", "--policy", bad, audit_dir)
    assert code == 2 and "rules.max_mean_score: unknown rule; did you mean" in err and "max_mean_candidate_score" in err


def test_policy_validation_names_the_key(tmp_path):
    for body, needle in (("version: 1\nrules:\n  max_point_score: high\n", "rules.max_point_score"),
                         ("version: 2\nrules: {}\n", "version"),
                         ("version: 1\nrules:\n  require_dp: {max_epsilon: -1}\n", "rules.require_dp.max_epsilon"),
                         ("version: 1\nrules:\n  max_fraction_candidates_above: {score: 0.2}\n",
                          "rules.max_fraction_candidates_above.fraction"),
                         ("version: 1\nscore: sslmem_z\nrules: {}\n", "score"),
                         ("version: 1\nrules:\n  max_unitmem: {every: 0.9}\n", "rules.max_unitmem.every: unknown key")):
        with pytest.raises(MemlensError, match=re.escape(needle)):
            load_policy(_policy(tmp_path, "p", body))
    for shipped in ("default", "strict"):
        assert load_policy(ROOT / "policies" / f"{shipped}.yaml").name == shipped
    with pytest.raises(MemlensError, match="require_signal was replaced: require_power"):
        load_policy(_policy(tmp_path, "old", "version: 1\nrules:\n  require_signal: true\n"))
    with pytest.raises(MemlensError, match="max_membership_auc"):
        load_policy(_policy(tmp_path, "nan", "version: 1\nrules:\n  max_membership_auc: .nan\n"))
    # every problem at once, each by key path and line, with a close match for typos
    with pytest.raises(MemlensError) as err:
        load_policy(_policy(tmp_path, "three", "version: 1\nnot_a_rule_at_all: 3\nrules:\n  max_point_scor: 0.5\n"
                                               "  max_unitmem: {any: 2}\n"))
    text = str(err.value)
    assert "3 problems" in text and "\n" not in text
    assert "not_a_rule_at_all: unknown key (line 2)" in text
    assert "rules.max_point_scor: unknown rule; did you mean max_point_score? (line 4)" in text
    assert "rules.max_unitmem.any: Input should be less than or equal to 1 (line 5)" in text
    with pytest.raises(MemlensError, match="rules: required"):
        load_policy(_policy(tmp_path, "norules", "version: 1\nname: x\n"))


def test_dockerfile_lints_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    out = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "libpango" in text and re.search(r"^USER 10001$", text, re.M) and 'ENTRYPOINT ["memlens"]' in text


@pytest.mark.slow
def test_pipeline_runs_end_to_end_and_resumes(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
data: {{source: digits}}
split: {{sizes: {{S_S: 200, S_C: 40, S_I: 40, S_E: 40}}}}
train:
  framework: mae
  model: {{arch: vit_micro, depth: 1, embed_dim: 16, num_heads: 2}}
  mae: {{decoder_dim: 16}}
  epochs: 1
  batch_size: 32
epsilons: [inf, 8]
audit: {{views: 4, bootstrap: 200}}
policy: {ROOT / 'policies' / 'default.yaml'}
""")
    assert run("keygen", "--out", tmp_path / "key.pem")[0] == 0
    code, out, err = run("run", cfg, "--out", tmp_path / "out", "--sign-key", tmp_path / "key.pem")
    out_dir = tmp_path / "out"
    passed = json.loads((out_dir / "gate.json").read_text())["passed"]
    assert code == (0 if passed else 1), err  # as memlens gate: 1 when the policy fails
    assert "signing run records and audits with" in out
    assert "train eps-8/f: started (" in out and "train eps-8/g: done in" in out  # progress a user can plan by
    for f in ("splits.json", "report.pdf", "report.html", "gate.json", "gate.md", "junit.xml",
              "audits/eps-inf/audit.json", "audits/eps-8/audit.json", "sweep/eps-8/f/model.safetensors"):
        assert (out_dir / f).is_file(), f
    a8 = read_audit(out_dir / "audits" / "eps-8")
    assert a8.summary.dp_epsilon <= 8 and a8.summary.integrity.get("signature")
    assert all(e.run_signed_by for e in a8.summary.encoders)  # the run records are signed too
    assert "Privacy levels compared" in (out_dir / "report.html").read_text()
    code, out, err = run("run", cfg, "--out", tmp_path / "out", "--sign-key", tmp_path / "key.pem",
                         "--no-fail-on-gate")
    assert code == 0 and "skipped (finished)" in out and "skipped (up to date)" in out
    # the gate pins the weights being released: an audit of other weights fails
    pol = tmp_path / "pin.yaml"
    pol.write_text("name: pin\nrules: {max_point_score: 1.0}\n")
    f8 = out_dir / "sweep" / "eps-8" / "f" / "model.safetensors"
    g8 = out_dir / "sweep" / "eps-8" / "g" / "model.safetensors"
    assert run("gate", out_dir / "audits" / "eps-8", "--policy", pol, "--weights", f8)[0] == 0
    code, out, _ = run("gate", out_dir / "audits" / "eps-8", "--policy", pol, "--weights", g8)
    assert code == 1 and "of other weights than the ones being" in out
    cfg.write_text(cfg.read_text().replace("epsilons: [inf, 8]", "epsilons: [inf, 20]"))
    code, _, err = run("run", cfg, "--out", tmp_path / "out")
    assert code == 2 and "different config; pass --force" in err
    code, _, err = run("run", cfg, "--out", tmp_path / "out2", "--sign-key", tmp_path / "p.yaml")
    assert code == 2 and "not an unencrypted PEM private key" in err and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("section, line, message", [
    ("audit", "audit: {pair: 5}", "audit.pair: unknown key"),
    ("audit", "audit: {distance: manhattan}", "audit.distance: Input should be"),
    ("train", "train: {framework: mae, model: {arch: vit_micro}, epoch: 3}", "train.epoch: unknown key"),
])
def test_pipeline_sections_are_checked_before_any_work(tmp_path, section, line, message):
    cfg = tmp_path / "p.yaml"
    body = "data: {source: digits}\ntrain: {framework: mae, model: {arch: vit_micro}}\n"
    if section == "train":
        body = "data: {source: digits}\n"
    cfg.write_text(body + line + "\n")
    code, _, err = run("run", cfg, "--out", tmp_path / "out")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # refused before the split and the training
