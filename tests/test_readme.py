"""README.md stays true: it starts with the two commands, and lists every setting."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from app.kernel.settings import Settings
from app.providers.registry import PROVIDERS

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
    for entry in PROVIDERS:  # each provider's group, declared by its adapter module
        names += environment_variables(entry.settings, entry.name.upper() + "__")

    assert "EVENTS__ALLOW_HTTP" in names  # nested groups are walked
    assert "TWILIO__AUTH_TOKEN" in names  # and the providers' groups
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


def test_the_quick_start_works_on_any_port() -> None:
    """The commands under "Try it" name no port: the CLI and curl find the running API's URL in
    .data/dev-api-url (tests/test_dev.py checks `smsgate dev` writes it, on a free port)."""
    try_it = README.split("## Try it", 1)[1].split("\n## ", 1)[0]
    second_terminal = try_it.split("In another terminal", 1)[1].split("```sh", 1)[1].split("```")[0]

    assert ":8000" not in second_terminal
    assert "URL=$(cat .data/dev-api-url)" in second_terminal
    assert second_terminal.count("curl -s $URL/v1/messages") == 2
    assert second_terminal.startswith("\n./scripts/smsgate send ")
    assert (ROOT / "scripts" / "smsgate").stat().st_mode & 0o111
    assert "PORT=8080 ./scripts/run" in try_it


def test_the_image_and_the_scripts_install_from_the_locks() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    lib = (ROOT / "scripts" / "lib.sh").read_text(encoding="utf-8")

    assert "pip install --require-hashes -r requirements/runtime.txt" in dockerfile
    assert "--no-deps --no-build-isolation ." in dockerfile
    assert '--require-hashes -r "$lock"' in lib and 'lock="requirements/$extras.txt"' in lib
    assert "./scripts/lock" in README
