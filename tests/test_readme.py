"""README.md's measured blocks are written by benchmarks/readme.py: the rewrite touches only its block, and the
blocks whose numbers do not depend on the machine match a fresh regeneration."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("readme_blocks", ROOT / "benchmarks" / "readme.py")
readme = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme)

README = (ROOT / "README.md").read_text()


def test_replace_block_rewrites_only_its_own_region():
    text = "\n".join(["intro", readme.marker("verify"), "old verify", readme.END, "middle",
                      readme.marker("models"), "old models", readme.END, "outro"])
    out = readme.replace_block(text, "verify", "new\nverify\n")
    assert out == text.replace("old verify", "new\nverify")
    assert readme.read_block(out, "verify") == "new\nverify" and readme.read_block(out, "models") == "old models"
    assert readme.replace_block(out, "verify", "old verify") == text  # idempotent round trip


@pytest.mark.parametrize("text,match", [
    ("no markers at all", "exactly once"),
    (f"{readme.marker('verify')}\nx\n{readme.END}\n{readme.marker('verify')}\ny\n{readme.END}", "exactly once"),
    (f"{readme.marker('verify')}\nno end marker", "no '<!-- end -->'"),
    (f"{readme.marker('verify')}\nx\n{readme.marker('models')}\ny\n{readme.END}", "before the next block"),
])
def test_replace_block_refuses_malformed_markers(text, match):
    with pytest.raises(ValueError, match=match):
        readme.replace_block(text, "verify", "body")


def test_readme_has_every_block_and_each_was_generated():
    for name in readme.BLOCKS:
        body = readme.read_block(README, name)
        assert body and "(run `python benchmarks/readme.py" not in body, f"block {name!r} was never generated"


def _verify_rows(block):
    rows = re.findall(r"^\| (float\S+, [^|]+?) \| (\S+) \| (\S+) \| (\S+) \|$", block, flags=re.M)
    return {label: [float(v) for v in values] for label, *values in rows}


def test_verify_block_matches_a_regeneration():
    """Roundoff-level errors (1e-13, 1e-7) depend on the BLAS kernels of the machine, so they are checked against
    bounds; the paper-mode border error is set by the mathematics (beta = 60 against real patches) and must equal
    the regenerated value to the printed digits: a typed-in number would not."""
    ours, fresh = _verify_rows(readme.read_block(README, "verify")), _verify_rows(readme.verify_block())
    assert list(ours) == list(fresh) == [label for label, _, _ in readme.VERIFY_MODES]
    paper = "float64, paper (no null key)"
    assert ours[paper][1:] == fresh[paper][1:] and ours[paper][1] > 1e-2
    for rows in (ours, fresh):
        assert max(rows["float64, null key"]) < 1e-10 and rows[paper][0] < 1e-10
        assert max(rows["float32, null key"]) < 1e-5


def test_models_block_matches_a_regeneration():
    # parameter counts and shapes: no roundoff, identical on every machine
    assert readme.read_block(README, "models") == readme.models_block()


def test_convert_net_finetune_block_matches_its_results_file():
    # a stored result, reported by its own script: the README must say what the JSON holds
    assert readme.read_block(README, "convert-net-finetune") == readme.convert_net_finetune_block()


def test_findings_block_matches_the_report_and_its_figures_exist():
    # the README quotes the report's "At a glance": the same text, with the figure links made relative to the README
    assert readme.read_block(README, "findings") == readme.findings_block()
    figures = re.findall(r"!\[[^]]*]\(([^)]+)\)", README)
    assert figures and all((ROOT / f).is_file() for f in figures), figures


def test_main_job_block_is_a_run_of_the_config_make_run_trains():
    # the README's main job must be what `make run` does today: results/main_job holds a run of that very config
    from cmhsa.config import load_config
    config = re.search(r"^run:.*\n\t\S*cmhsa pipeline --config (\S+)$", (ROOT / "Makefile").read_text(), re.M)[1]
    made = load_config(ROOT / config)  # the run directory keeps a budget in steps as the epochs it came to
    assert load_config(ROOT / "results/main_job/config.yaml") == made.in_epochs(made.data.train_subset)
    assert readme.read_block(README, "main-job") == readme.main_job_block()
