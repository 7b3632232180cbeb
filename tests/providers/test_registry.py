"""The provider registry: the built-in entries, their settings read from the same variables as
ever (`TWILIO__*`, `VONAGE__*`, `FAKE__*`, environment or `.env`), and registration rules."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel, SecretStr, ValidationError

from app.cli import main as cli
from app.kernel.settings import Settings, get_settings
from app.providers.fake import FakeProvider, FakeProviderSettings
from app.providers.registry import PROVIDERS, ProviderEntry, build_providers
from app.providers.twilio import TwilioProvider, TwilioSettings
from app.providers.vonage import VonageProvider, VonageSettings

SID = "AC" + "0123456789abcdef" * 2


@pytest.fixture
def no_provider_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A working directory without `.env`, and no provider variables set."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.upper().startswith(("TWILIO__", "VONAGE__", "FAKE__")):
            monkeypatch.delenv(name)
    return tmp_path


def test_the_built_in_providers_are_registered() -> None:
    assert PROVIDERS.names() == ["fake", "twilio", "vonage"]
    assert PROVIDERS.with_webhooks() == ["twilio", "vonage"]


async def test_provider_settings_come_from_their_variables(
    no_provider_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWILIO__ACCOUNT_SID", SID)
    monkeypatch.setenv("twilio__auth_token", "token")  # case-insensitive, as before
    monkeypatch.setenv("FAKE__DELIVERY_DELAY_SECONDS", "0.5")
    (no_provider_env / ".env").write_text(
        "VONAGE__API_KEY=vonage01\nVONAGE__SIGNATURE_METHOD=sha1\n"
    )
    settings = Settings()

    twilio = settings.section("twilio", TwilioSettings)
    vonage = settings.section("vonage", VonageSettings)
    async with httpx.AsyncClient() as http:
        providers = build_providers(settings, http)

    assert (twilio.account_sid, twilio.auth_token) == (SID, SecretStr("token"))
    assert (vonage.api_key, vonage.signature_method) == ("vonage01", "sha1")
    assert settings.section("fake", FakeProviderSettings).delivery_delay_seconds == 0.5
    assert isinstance(providers["twilio"], TwilioProvider)
    assert isinstance(providers["vonage"], VonageProvider)
    assert isinstance(providers["fake"], FakeProvider)


async def test_a_provider_without_credentials_is_not_built(no_provider_env: Path) -> None:
    async with httpx.AsyncClient() as http:
        providers = build_providers(Settings(), http)

    assert sorted(providers) == ["fake"]


def test_an_invalid_provider_setting_is_refused(
    no_provider_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VONAGE__SIGNATURE_METHOD", "crc32")

    with pytest.raises(ValidationError, match="signature_method"):
        Settings().section("vonage", VonageSettings)


@pytest.mark.parametrize("command", [["migrate"], ["worker", "--check"], ["serve"]])
def test_a_process_refuses_to_start_on_an_invalid_provider_setting(
    no_provider_env: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.setenv("VONAGE__SIGNATURE_METHOD", "crc32")
    get_settings.cache_clear()
    # Reached only if the check let the command through.
    monkeypatch.setattr(cli, "_RUNS", dict.fromkeys(cli._RUNS, _never))
    try:
        with pytest.raises(ValidationError, match="signature_method"):
            cli.main(command)
    finally:
        get_settings.cache_clear()


def _never(args: object) -> None:
    raise AssertionError("the command ran")


def test_given_sections_win_over_the_environment(
    no_provider_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWILIO__ACCOUNT_SID", SID)
    settings = Settings()

    given = settings.with_sections(twilio=TwilioSettings(account_sid="ACgiven"))

    assert given.section("twilio", TwilioSettings).account_sid == "ACgiven"
    assert settings.section("twilio", TwilioSettings).account_sid == SID


class _Nothing(BaseModel):
    pass


def test_registration_refuses_a_taken_or_malformed_name() -> None:
    def build(settings: _Nothing, context: object) -> None:
        return None

    with pytest.raises(ValueError, match="registered"):
        PROVIDERS.register(ProviderEntry("twilio", _Nothing, build))
    with pytest.raises(ValueError, match="lower-case"):
        PROVIDERS.register(ProviderEntry("Plivo", _Nothing, build))
    with pytest.raises(ValueError, match="lower-case"):
        PROVIDERS.register(ProviderEntry("pli-vo", _Nothing, build))
    with pytest.raises(ValueError, match="20 characters at most"):
        PROVIDERS.register(ProviderEntry("a_provider_name_too_long", _Nothing, build))
    assert PROVIDERS.names() == ["fake", "twilio", "vonage"]
