"""Configuration: flags, environment (the Go project's names), TOML file, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from aoaiproxy.config import (
    DEFAULT_MODELS,
    ConfigError,
    load_config,
    parse_listen,
    parse_model_map,
)

EP = {"endpoint": "https://res.openai.azure.com"}


def test_defaults() -> None:
    c = load_config(EP, {})
    assert c.mode == "azure"
    assert c.listen == ("tcp:8080",)
    assert c.api_version == "2024-10-21"
    assert dict(c.models) == dict(DEFAULT_MODELS)
    assert c.forward_allow == ("api.openai.com:443", "res.openai.azure.com:443")
    assert c.max_body == 64 * 1024 * 1024
    assert (c.drain_timeout, c.connect_timeout, c.upstream_timeout) == (30, 10, 600)
    assert c.server_key is None and not c.keep_filter_frames and c.log_format == "text"


def test_go_environment_variables() -> None:
    env = {
        "AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com/",
        "AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:9000,[::1]:9001,0.0.0.0:9002",
        "AZURE_OPENAI_PROXY_MODE": "azure",
        "AZURE_OPENAI_API_VER": "2024-06-01",
        "AZURE_OPENAI_MODEL_MAPPER": "gpt-4o=prod-4o, gpt-3.5-turbo=my35",
    }
    c = load_config({}, env)
    assert c.endpoint == "https://x.openai.azure.com"
    assert c.listen == ("tcp:9000:interface=127.0.0.1", "tcp:9001:interface=\\:\\:1", "tcp:9002")
    assert c.api_version == "2024-06-01"
    assert c.models["gpt-4o"] == "prod-4o"
    assert c.models["gpt-3.5-turbo"] == "my35"
    assert c.models["gpt-3.5-turbo-16k"] == "gpt-35-turbo-16k"
    # AZURE_OPENAI_APIVERSION wins over the older name.
    assert load_config({}, {**env, "AZURE_OPENAI_APIVERSION": "2025-01-01"}).api_version == "2025-01-01"


def test_precedence_and_per_model_merge(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'endpoint = "https://file.openai.azure.com"\napi_version = "2024-02-01"\n'
        'max_body = 1000\n[models]\na = "from-file"\nb = "from-file"\nc = "from-file"\n'
        '[forward]\nallow = ["*.example.com:443"]\n'
    )
    env = {
        "AOAIPROXY_CONFIG": str(cfg),
        "AZURE_OPENAI_MODEL_MAPPER": "b=from-env,c=from-env",
        "AZURE_OPENAI_APIVERSION": "2024-03-01",
    }
    c = load_config({"model_mapper": ["c=from-flag"], "api_version": "2024-04-01"}, env)
    assert c.endpoint == "https://file.openai.azure.com"
    assert c.api_version == "2024-04-01"
    assert (c.models["a"], c.models["b"], c.models["c"]) == ("from-file", "from-env", "from-flag")
    assert c.models["gpt-3.5-turbo"] == "gpt-35-turbo"
    assert c.max_body == 1000
    assert c.forward_allow == ("*.example.com:443",)
    assert c.config_file == str(cfg)


@pytest.mark.parametrize(
    ("flags", "env", "option"),
    [
        ({"mode": "bogus"}, {}, "--mode"),
        ({"model_mapper": ["gpt-4o"]}, {}, "--model-mapper"),
        ({"model_mapper": ["a=b/c"]}, {}, "--model-mapper"),
        ({}, {"AZURE_OPENAI_MODEL_MAPPER": "x=,y=z"}, "AZURE_OPENAI_MODEL_MAPPER"),
        ({"endpoint": "ftp://x"}, {}, "--endpoint"),
        ({"endpoint": "not a url"}, {}, "--endpoint"),
        ({"token_file": "/nonexistent/key"}, {}, "--token-file"),
        ({"listen": ["nonsense"]}, {}, "--listen"),
        ({"listen": ["host:99999"]}, {}, "--listen"),
        ({"forward_allow": ["no-port"]}, {}, "--forward-allow"),
        ({"forward_allow": ["a.*.com:443"]}, {}, "--forward-allow"),
        ({"max_body": "lots"}, {}, "--max-body"),
        ({"log_format": "xml"}, {}, "--log-format"),
        ({"connect_timeout": "0"}, {}, "--connect-timeout"),
        ({"token": "secret-server-key"}, {}, "--token"),
    ],
)
def test_invalid_input_names_the_option(flags: dict[str, object], env: dict[str, str], option: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config({**EP, **flags}, env)
    assert e.value.option == option


@pytest.mark.parametrize(
    "flags",
    [
        {"token": "secret-server-key"},  # refused: an open relay
        {"token": "secret-server-key", "allow_anonymous": True, "mode": "bogus"},
    ],
)
def test_config_errors_never_show_the_key(flags: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config({**EP, **flags}, {"AZURE_OPENAI_TOKEN": "env-secret-key"})
    assert "secret-server-key" not in str(e.value)
    assert "env-secret-key" not in str(e.value)


def test_endpoint_required_in_azure_mode_only() -> None:
    with pytest.raises(ConfigError, match="--endpoint"):
        load_config({}, {})
    c = load_config({"mode": "openai"}, {})
    assert c.endpoint == "https://api.openai.com"
    assert c.forward_allow == ("api.openai.com:443",)


def test_unknown_config_key_and_bad_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('endpoint = "https://a.b"\nendpiont = "typo"\n')
    with pytest.raises(ConfigError, match="endpiont"):
        load_config({"config": str(bad)}, {})
    bad.write_text("endpoint = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config({"config": str(bad)}, {})
    bad.write_text("[forward]\nallowed = []\n")
    with pytest.raises(ConfigError, match=r"forward\.allowed"):
        load_config({**EP, "config": str(bad)}, {})


def test_key_files(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("  server-key-123 \n")
    clients = tmp_path / "clients"
    clients.write_text("# comment\n\na\n b \n")
    c = load_config({**EP, "token_file": str(key), "client_keys": str(clients)}, {})
    assert c.server_key == "server-key-123"
    assert c.client_keys == frozenset({"a", "b"})
    assert "server-key-123" not in repr(c) and "'a'" not in repr(c)
    empty = tmp_path / "empty"
    empty.write_text("\n# nothing\n")
    with pytest.raises(ConfigError, match="--client-keys"):
        load_config({**EP, "token_file": str(key), "client_keys": str(empty)}, {})


def test_open_relay_needs_allow_anonymous() -> None:
    with pytest.raises(ConfigError, match="--allow-anonymous"):
        load_config({**EP}, {"AZURE_OPENAI_TOKEN": "k"})
    c = load_config({**EP, "allow_anonymous": True}, {"AZURE_OPENAI_TOKEN": "k"})
    assert c.server_key == "k" and c.allow_anonymous


def test_forward_allow_none_and_users(tmp_path: Path) -> None:
    assert load_config({**EP, "forward_allow": ["none"]}, {}).forward_allow == ()
    assert load_config(EP, {"AOAIPROXY_FORWARD_ALLOW": "a.com:443, *.b.com:8443"}).forward_allow == (
        "a.com:443",
        "*.b.com:8443",
    )
    users = tmp_path / "users"
    users.write_text("alice:pw:with:colons\n")
    c = load_config({**EP, "forward_users": str(users)}, {})
    assert dict(c.forward_users) == {"alice": "pw:with:colons"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1"),
        ("ssl:8443:privateKey=k.pem:certKey=c.pem", "ssl:8443:privateKey=k.pem:certKey=c.pem"),
        ("unix:/run/a.sock", "unix:/run/a.sock"),
        ("systemd:domain=INET:name=aoaiproxy", "systemd:domain=INET:name=aoaiproxy"),
        (":8080", "tcp:8080"),
        ("localhost:8080", "tcp:8080:interface=localhost"),
    ],
)
def test_parse_listen(value: str, expected: str) -> None:
    assert parse_listen(value) == expected


def test_parse_model_map() -> None:
    assert parse_model_map("a=b,,c = d ,") == {"a": "b", "c": "d"}
