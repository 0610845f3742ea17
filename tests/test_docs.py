r"""The docs read the registry: generated reference up to date, every loss documented, the changelog's version."""
import re
from pathlib import Path

import loss_service
from loss_service import losses
from loss_service.docs import render_reference

ROOT = Path(__file__).resolve().parent.parent


def test_generated_reference_is_up_to_date():
    committed = (ROOT / "docs" / "reference.md").read_text()
    assert committed == render_reference(), "regenerate: python -m loss_service.docs > docs/reference.md"


def test_every_loss_and_parameter_is_in_the_hand_written_docs():
    text = (ROOT / "docs" / "losses.md").read_text()
    for page in sorted((ROOT / "docs" / "losses").glob("*.md")):
        text += page.read_text()
    for spec in losses.specs():
        assert f"`{spec.name}`" in text, f"{spec.name} missing from docs/losses.md and docs/losses/"
        for param in spec.params:
            assert f"`{param.name}`" in text, f"{spec.name}.{param.name} missing from the loss docs"


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in readme[:30] if line.startswith("bash scripts/")]
    assert commands[:2] == ["bash scripts/serve.sh", "bash scripts/test.sh"]


def test_readme_lists_every_loss():
    readme = (ROOT / "README.md").read_text()
    for name in losses.names():
        assert f"| `{name}` |" in readme, f"{name} missing from the README's loss table"


def test_changelog_has_unreleased_then_the_current_version():
    headings = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert headings[:2] == ["Unreleased", loss_service.__version__], "CHANGELOG.md: add the version's entry"


def test_artifact_counts_in_the_docs_are_the_plans():
    from loss_service import export

    everything, readiness = export.plan(), export.plan(all_variants=False)
    background = len(everything) - len(readiness)
    service = (ROOT / "docs" / "service.md").read_text()
    assert f"`--alpha=scalar`; {background} files," in service, f"docs/service.md: {background} background variants"
    assert f"export of the {len(readiness)} artifacts" in service
    scripts = sum(job.format == "torchscript" for job in everything)
    assert f"{scripts} + {len(everything) - scripts} today" in (ROOT / "docs" / "export.md").read_text()
