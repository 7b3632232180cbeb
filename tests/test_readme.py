"""README.md stays true: it starts with the two commands, and lists every setting."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def environment_variables(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += environment_variables(annotation, prefix + name.upper() + "__")
        else:
            names.append(prefix + name.upper())
    return names


def test_every_setting_is_documented() -> None:
    names = environment_variables(Settings)

    assert "TWILIO__AUTH_TOKEN" in names  # nested groups are walked
    missing = [name for name in names if f"`{name}`" not in README]
    assert missing == []


def test_readme_starts_with_the_run_and_test_commands() -> None:
    lines = README.splitlines()

    assert lines[0] == "```sh"
    assert lines[1].startswith("./scripts/run ")
    assert lines[2].startswith("./scripts/test ")
    assert (ROOT / "scripts" / "run").stat().st_mode & 0o111
    assert (ROOT / "scripts" / "test").stat().st_mode & 0o111


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")

    assert "./scripts/test" in ci
