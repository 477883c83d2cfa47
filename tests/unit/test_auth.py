"""API and admin keys: where they come from (flags, environment, files) and which
routes take which (``dynrt.runtime.auth``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dynrt.runtime import config as config_flags
from dynrt.runtime.auth import Authenticator, KeySet, bearer_key, read_key_file
from dynrt.runtime.config import FrontendConfig, RouterConfig, from_args


def parse(config_type: type, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config_flags.add_arguments(parser, config_type)
    return parser.parse_args(argv)


def test_key_flags_repeat_and_env_is_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNRT_API_KEY", " env-a, env-b ,, ")
    monkeypatch.setenv("DYNRT_ADMIN_API_KEY", "env-admin")
    config = from_args(FrontendConfig, parse(FrontendConfig, []))
    assert config.auth.api_key == ["env-a", "env-b"] and config.auth.admin_api_key == ["env-admin"]
    # a flag wins over the environment, and repeats
    config = from_args(FrontendConfig, parse(FrontendConfig, ["--api-key", "one", "--api-key", "two"]))
    assert config.auth.api_key == ["one", "two"] and config.auth.admin_api_key == ["env-admin"]
    router = from_args(RouterConfig, parse(RouterConfig, ["--admin-api-key-file", "/x"]))
    assert router.auth.admin_api_key_file == "/x" and router.auth.api_key == ["env-a", "env-b"]


def test_defaults_have_no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DYNRT_API_KEY", "DYNRT_API_KEY_FILE", "DYNRT_ADMIN_API_KEY", "DYNRT_ADMIN_API_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    auth = from_args(FrontendConfig, parse(FrontendConfig, [])).auth
    assert (auth.api_key, auth.api_key_file, auth.admin_api_key, auth.admin_api_key_file) == ([], "", [], "")
    help_text = argparse.ArgumentParser()
    config_flags.add_arguments(help_text, FrontendConfig)
    assert "repeatable; env DYNRT_API_KEY, comma-separated" in help_text.format_help().replace("\n", " ").replace(
        "  ", " ")


def test_key_file_skips_blank_lines_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team A\nkey-one\n\n   key-two  \n  # old: key-zero\n")
    assert read_key_file(str(path)) == ["key-one", "key-two"]
    with pytest.raises(SystemExit, match="cannot read key file"):
        read_key_file(str(tmp_path / "missing"))


def test_from_config_merges_flags_and_files_and_refuses_bad_keys(tmp_path: Path) -> None:
    (tmp_path / "api").write_text("file-key\n")
    (tmp_path / "admin").write_text("admin-key\n")
    config = FrontendConfig(auth=config_flags.AuthConfig(api_key=["flag-key"], api_key_file=str(tmp_path / "api"),
                                                         admin_api_key_file=str(tmp_path / "admin")))
    auth = Authenticator.from_config(config.auth)
    assert len(auth.api_keys) == 2 and len(auth.admin_keys) == 1
    assert "file-key" in auth.api_keys and "flag-key" in auth.api_keys and "admin-key" not in auth.api_keys
    with pytest.raises(SystemExit, match="white space"):
        Authenticator.from_config(config_flags.AuthConfig(api_key=["two words"]))
    with pytest.raises(SystemExit, match="empty key"):
        Authenticator.from_config(config_flags.AuthConfig(admin_api_key=[" "]))


def test_key_set_matches_whole_keys_only() -> None:
    keys = KeySet(["alpha", "beta", "alpha"])
    assert len(keys) == 2
    assert "alpha" in keys and "beta" in keys
    for wrong in ("alph", "alphaa", "", "ALPHA", "gamma", None, b"alpha"):
        assert wrong not in keys
    assert "x" not in KeySet()


@pytest.mark.parametrize("header, key", [
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("BEARER  abc ", "abc"), ("Bearer", None), ("Bearer  ", None),
    ("Basic abc", None), ("abc", None), ("", None), (None, None),
])
def test_bearer_key(header: str | None, key: str | None) -> None:
    assert bearer_key(header) == key


def test_who_may_call_what() -> None:
    both = Authenticator(["api"], ["admin"])
    assert both.check("open", None) is None
    assert both.check("api", "Bearer api") is None
    assert both.check("api", "Bearer admin") == "invalid"  # roles are separate
    assert both.check("api", None) == "missing"
    assert both.check("admin", "Bearer admin") is None
    assert both.check("admin", "Bearer api") == "invalid"
    assert both.check("admin", "Basic admin") == "missing"

    api_only = Authenticator(["api"])  # state changes take the API keys
    assert api_only.check("admin", "Bearer api") is None
    assert api_only.check("admin", None) == "missing"
    assert api_only.describe()["state_changes_by"] == "API keys"

    admin_only = Authenticator([], ["admin"])  # OpenAI endpoints open, state changes guarded
    assert admin_only.check("api", None) is None
    assert admin_only.check("admin", "Bearer nope") == "invalid"

    none = Authenticator()  # development: everything open
    assert none.check("admin", None) is None and none.check("api", None) is None
    assert none.describe()["state_changes_by"] == "anyone (no key configured)"
