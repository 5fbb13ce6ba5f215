"""Configuration: flags, environment (the Go project's names), TOML file, defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.logger import Logger, formatEvent, globalLogPublisher

from aoaiproxy.capacity import connections_for, open_file_limit
from aoaiproxy.config import (
    DEFAULT_MODELS,
    Config,
    ConfigError,
    LiveConfig,
    load_config,
    parse_listen,
    parse_model_map,
)
from aoaiproxy.log import log_startup
from aoaiproxy.service import Reloader

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


# -- new options: Entra ID, failover, interception, state, metrics, workers ------------------


def test_new_option_defaults() -> None:
    c = load_config(EP, {"HOME": "/home/u"})
    assert (c.auth, c.entra_scope) == ("key", "https://cognitiveservices.azure.com/.default")
    assert (c.max_attempts, c.max_cooldown) == (3, 60.0)
    assert not c.intercept and c.intercept_hosts == ("api.openai.com:443",)
    assert c.intercept_ca_cert is None and c.intercept_ca_key is None
    assert c.state_dir == "/home/u/.local/state/aoaiproxy"
    assert load_config(EP, {"STATE_DIRECTORY": "/var/lib/aoaiproxy"}).state_dir == "/var/lib/aoaiproxy"
    assert c.metrics_listen is None and c.workers == 1
    assert c.max_connections == connections_for(open_file_limit())  # tests/test_capacity.py
    assert c.client_names == {}


def test_new_options_from_the_file_and_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'endpoint = "https://r.openai.azure.com"\nauth = "entra"\nentra_scope = "api://x/.default"\n'
        "allow_anonymous = true\nmax_attempts = 2\nmax_cooldown = 30\n"
        'state_dir = "/srv/state"\nmetrics_listen = "127.0.0.1:9100"\nworkers = "auto"\n'
        '[intercept]\nenabled = true\nhosts = ["API.example.com", "b.example:8443", "[::1]"]\n'
        'ca_cert = "/etc/ca.pem"\nca_key = "/etc/ca-key.pem"\n'
    )
    c = load_config({"config": str(cfg)}, {})
    assert (c.auth, c.entra_scope, c.max_attempts, c.max_cooldown) == ("entra", "api://x/.default", 2, 30.0)
    assert c.intercept
    assert c.intercept_hosts == ("api.openai.com:443", "api.example.com:443", "b.example:8443", "[::1]:443")
    assert (c.intercept_ca_cert, c.intercept_ca_key) == ("/etc/ca.pem", "/etc/ca-key.pem")
    assert c.state_dir == "/srv/state" and c.metrics_listen == "tcp:9100:interface=127.0.0.1"
    assert c.workers >= 1
    # flags > environment > file
    env = {"AOAIPROXY_CONFIG": str(cfg), "AZURE_OPENAI_AUTH": "key", "STATE_DIRECTORY": "/env/state"}
    c = load_config({"max_attempts": "5", "workers": "3"}, env)
    assert (c.auth, c.state_dir, c.max_attempts, c.workers) == ("key", "/env/state", 5, 3)
    assert load_config({"state_dir": "/flag"}, env).state_dir == "/flag"


@pytest.mark.parametrize(
    ("flags", "toml", "option", "problem"),
    [
        ({"auth": "token"}, "", "--auth", "'token' is not key or entra"),
        ({"max_attempts": "0"}, "", "--max-attempts", "must be at least 1"),
        ({"max_cooldown": "0"}, "", "--max-cooldown", "must be more than 0 seconds"),
        ({"workers": "0"}, "", "--workers", "must be at least 1 (or auto)"),
        ({"metrics_listen": "nonsense"}, "", "--metrics-listen", "'nonsense' is neither host:port"),
        ({}, "[intercept]\nhosts = ['a..b']\n", "intercept.hosts", "'a..b' is not a host or host:port"),
        ({}, "[intercept]\nhosts = ['a:99999']\n", "intercept.hosts", "is not a host or host:port"),
        ({}, "[intercept]\nca_cert = '/c.pem'\n", "intercept.ca_key", "is missing"),
        ({}, "[intercept]\nca_key = '/k.pem'\n", "intercept.ca_cert", "is missing"),
        ({}, "[intercept]\nenabled = 'maybe'\n", "intercept.enabled", "'maybe' is not true or false"),
        ({}, "[intercept]\nenabeld = true\n", "--config", "unknown key 'intercept.enabeld'"),
        ({}, "intercept = true\n", "--config", "[intercept] must be a table"),
        ({"mode": "openai", "intercept": True}, "", "--intercept", "works in azure mode only"),
        ({}, "max_headers = 7.5\n", "--max-headers", "7.5 is not a whole number"),
        ({}, "max_headers = true\n", "--max-headers", "must be a number, not a boolean"),
        ({}, "mode = ['azure']\n", "--mode", "must be a string, not an array"),
        ({"auth": "entra", "token": "k", "allow_anonymous": True}, "", "--auth", "give no server key"),
        ({"auth": "entra", "mode": "openai"}, "", "--auth", "entra is for azure mode"),
        ({"auth": "entra"}, "", "--auth", "without --client-keys would let anyone use it"),
    ],
)
def test_new_option_errors(
    flags: dict[str, object], toml: str, option: str, problem: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config({**EP, "config": str(cfg), **flags}, {})
    assert e.value.option == option
    assert problem in e.value.problem


def test_workers_auto_is_one_per_cpu() -> None:
    assert load_config({**EP, "workers": "auto"}, {}).workers == (os.cpu_count() or 1)


# -- backends ---------------------------------------------------------------------------------

BACKENDS = """
[[backend]]
name = "east"
endpoint = "https://east.openai.azure.com/"
api_key_file = "{key}"
priority = 0
weight = 2
models = { "gpt-4o" = "prod-4o", "gpt-4o-mini" = "mini" }

[[backend]]
name = "west.2"
endpoint = "https://west.openai.azure.com"
auth = "entra"
priority = 1

[[backend]]
name = "north"
endpoint = "https://north.openai.azure.com"
api_key = "north-secret-key"
entra_scope = "unused"
"""


def backends_config(tmp_path: Path, text: str = BACKENDS, extra: str = "") -> str:
    key = tmp_path / "east.key"
    key.write_text("east-secret-key\n")
    clients = tmp_path / "clients"
    clients.write_text("team:team-key\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'client_keys_file = "{clients}"\nentra_scope = "api://global/.default"\n{extra}'
        + text.replace("{key}", str(key))
    )
    return str(cfg)


def test_backends(tmp_path: Path) -> None:
    c = load_config({"config": backends_config(tmp_path)}, {})
    east, west, north = c.backends
    assert (east.name, east.endpoint, east.api_key, east.auth) == (
        "east",
        "https://east.openai.azure.com",
        "east-secret-key",
        "key",
    )
    assert (east.priority, east.weight, dict(east.models or {})) == (
        0,
        2,
        {"gpt-4o": "prod-4o", "gpt-4o-mini": "mini"},
    )
    assert (west.name, west.auth, west.api_key, west.priority, west.weight, west.models) == (
        "west.2",
        "entra",
        None,
        1,
        1,
        None,
    )
    assert west.entra_scope == "api://global/.default"
    assert (north.api_key, north.entra_scope) == ("north-secret-key", "unused")
    # Code written for one upstream sees the first backend.
    assert (c.endpoint, c.server_key) == ("https://east.openai.azure.com", "east-secret-key")
    assert c.forward_allow == (
        "api.openai.com:443",
        "east.openai.azure.com:443",
        "west.openai.azure.com:443",
        "north.openai.azure.com:443",
    )
    assert "secret" not in repr(c)


@pytest.mark.parametrize(
    ("flags", "env"),
    [
        ({}, {}),
        ({"token": "server-key"}, {}),
        ({"auth": "entra"}, {}),
    ],
)
def test_one_backend_form_is_the_backend_named_default(flags: dict[str, str], env: dict[str, str]) -> None:
    c = load_config({**EP, "allow_anonymous": True, **flags}, env)
    (backend,) = c.backends
    expected = "key" if "token" in flags else flags.get("auth", "client")
    assert (backend.name, backend.endpoint, backend.auth, backend.priority, backend.weight) == (
        "default",
        "https://res.openai.azure.com",
        expected,
        0,
        1,
    )
    assert backend.api_key == flags.get("token") and backend.models is None
    assert backend.entra_scope == "https://cognitiveservices.azure.com/.default"


@pytest.mark.parametrize(
    ("table", "option", "problem"),
    [
        ('name = "a"\nendpoint = "https://a.example"\n', "backend[a]", "needs exactly one credential"),
        (
            'name = "a"\nendpoint = "https://a.example"\napi_key = "k"\nauth = "entra"\n',
            "backend[a]",
            'it has api_key and auth = "entra"',
        ),
        (
            'name = "a"\nendpoint = "https://a.example"\nauth = "client"\n',
            "backend[a].auth",
            "is not key or entra",
        ),
        ('name = "a"\nendpoint = "https://a.example"\nauth = "key"\n', "backend[a]", "it has none"),
        (
            'name = "a"\nendpoint = "https://a.example"\napi_key = "k"\nwieght = 2\n',
            "backend[a].wieght",
            "unknown key",
        ),
        ('name = "a b"\nendpoint = "https://a.example"\napi_key = "k"\n', "backend[1].name", "must match"),
        ('endpoint = "https://a.example"\napi_key = "k"\n', "backend[1].name", "is missing"),
        ('name = "a"\napi_key = "k"\n', "backend[a].endpoint", "is missing"),
        (
            'name = "a"\nendpoint = "ftp://a.example"\napi_key = "k"\n',
            "backend[a].endpoint",
            "not an http(s) URL",
        ),
        (
            'name = "a"\nendpoint = "https://a.example"\napi_key = "k"\nweight = 0\n',
            "backend[a].weight",
            "at least 1",
        ),
        (
            'name = "a"\nendpoint = "https://a.example"\napi_key = "k"\npriority = "1"\n',
            "backend[a].priority",
            "not a string",
        ),
        (
            'name = "a"\nendpoint = "https://a.example"\napi_key = "k"\nmodels = { m = "a/b" }\n',
            "backend[a].models",
            "must match",
        ),
        (
            'name = "a"\nendpoint = "https://a.example"\napi_key = "k"\nmodels = {}\n',
            "backend[a].models",
            "serve no model",
        ),
        (
            'name = "a"\nendpoint = "https://a.example"\napi_key_file = "/nonexistent"\n',
            "backend[a].api_key_file",
            "cannot read",
        ),
    ],
)
def test_backend_errors(table: str, option: str, problem: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config({"config": backends_config(tmp_path, "[[backend]]\n" + table)}, {})
    assert (e.value.option, "\n" in str(e.value)) == (option, False)
    assert problem in e.value.problem


def test_backend_names_are_unique_and_forms_do_not_mix(tmp_path: Path) -> None:
    twice = '[[backend]]\nname = "a"\nendpoint = "https://a.example"\napi_key = "k"\n' * 2
    with pytest.raises(ConfigError, match=r"^backend\[a\]\.name: is used by an earlier backend"):
        load_config({"config": backends_config(tmp_path, twice)}, {})
    cfg = backends_config(tmp_path)
    for flags, env, option in [
        ({"endpoint": "https://x.example"}, {}, "--endpoint"),
        ({}, {"AZURE_OPENAI_ENDPOINT": "https://x.example"}, "AZURE_OPENAI_ENDPOINT"),
        ({"token": "k"}, {}, "--token"),
        ({"auth": "entra"}, {}, "--auth"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config({"config": cfg, **flags}, env)
        assert e.value.option == option and "use one form, not both" in e.value.problem
    with pytest.raises(ConfigError, match="for azure mode"):
        load_config({"config": cfg, "mode": "openai"}, {})
    with pytest.raises(ConfigError, match="one form"):
        load_config({"config": backends_config(tmp_path, extra='endpoint = "https://x.example"\n')}, {})
    with pytest.raises(ConfigError, match="one or more"):
        load_config({"config": backends_config(tmp_path, "backend = []\n")}, {})


def test_backends_need_client_keys_unless_anonymous(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[backend]]\nname = "a"\nendpoint = "https://a.example"\nauth = "entra"\n')
    with pytest.raises(ConfigError, match="--allow-anonymous") as e:
        load_config({"config": str(cfg)}, {})
    assert e.value.option == "backend"
    assert load_config({"config": str(cfg), "allow_anonymous": True}, {}).backends[0].auth == "entra"


# -- client keys with names -------------------------------------------------------------------


def test_client_keys_with_names(tmp_path: Path) -> None:
    clients = tmp_path / "clients"
    clients.write_text("# team keys\nalice:alice-key-1\n\nunnamed-key\nbob : bob:key:with:colons \n")
    c = load_config({**EP, "client_keys": str(clients)}, {})
    assert c.client_keys == frozenset({"alice-key-1", "unnamed-key", "bob:key:with:colons"})
    assert dict(c.client_names) == {
        "alice-key-1": "alice",
        "unnamed-key": "key2",
        "bob:key:with:colons": "bob",
    }
    assert "alice-key-1" not in repr(c)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("al ice:secret-key-1\n", "line 1: the name before ':' must match"),
        ("alice:\n", "line 1: no key after alice:"),
        ("a:secret-key-1\n\nb:secret-key-1\n", "line 3: the same key as a"),
        ("a:secret-key-1\na:secret-key-2\n", "line 2: the name a is taken"),
        ("key2:secret-key-1\nsecret-key-2\n", "line 2: the name key2 is taken"),
        ("# nothing\n", "holds no key"),
    ],
)
def test_client_keys_file_errors_never_show_a_key(content: str, problem: str, tmp_path: Path) -> None:
    clients = tmp_path / "clients"
    clients.write_text(content)
    with pytest.raises(ConfigError) as e:
        load_config({**EP, "client_keys": str(clients)}, {})
    assert e.value.option == "--client-keys" and problem in e.value.problem
    assert "secret" not in str(e.value)


# -- secrets are never shown ------------------------------------------------------------------

SECRET = "sk-never-shown-0123"


@pytest.mark.parametrize(
    "toml",
    [
        f'api_key = ["{SECRET}"]',
        f'api_key = {{ k = "{SECRET}" }}',
        "api_key = 12345678901234",
        f'api_key_file = ["{SECRET}"]',
        f'client_keys_file = {{ k = "{SECRET}" }}',
        f'[forward]\nusers_file = ["{SECRET}"]',
        f'[[backend]]\nname = "a"\nendpoint = "https://a.example"\napi_key = ["{SECRET}"]',
        '[[backend]]\nname = "a"\nendpoint = "https://a.example"\napi_key = 12345678901234',
        f'[[backend]]\nname = "a"\nendpoint = "https://a.example"\napi_key_file = {{ p = "{SECRET}" }}',
    ],
)
def test_secret_values_of_the_wrong_type_are_never_shown(toml: str, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'endpoint = "https://r.openai.azure.com"\nallow_anonymous = true\n{toml}\n')
    with pytest.raises(ConfigError) as e:
        load_config({"config": str(cfg)}, {})
    assert SECRET not in str(e.value) and "12345678901234" not in str(e.value)
    assert "must be a string, not" in str(e.value)
    # The same on SIGHUP: the reload error is logged, without the value.
    cfg.write_text('endpoint = "https://r.openai.azure.com"\n')
    live = LiveConfig(load_config({"config": str(cfg)}, {}))
    cfg.write_text(f'endpoint = "https://r.openai.azure.com"\nallow_anonymous = true\n{toml}\n')
    events: list[dict[str, object]] = []
    assert not Reloader({"config": str(cfg)}, {}, live, log=Logger(observer=events.append)).reload()
    text = "\n".join(formatEvent(event) for event in events)
    assert "must be a string, not" in text
    assert SECRET not in text and "12345678901234" not in text


def test_endpoint_with_a_user_or_password_is_refused_without_showing_it() -> None:
    for flags in (
        {"endpoint": "https://usr9:pa55word@r.openai.azure.com"},
        {"endpoint": "ftp://usr9:pa55word@r.openai.azure.com"},
        {"endpoint": "https://usr9:pa55word@r.openai.azure.com/?q#f"},
    ):
        with pytest.raises(ConfigError) as e:
            load_config(flags, {})
        assert (
            e.value.option == "--endpoint" and "pa55word" not in str(e.value) and "usr9" not in str(e.value)
        )
    with pytest.raises(ConfigError, match="must not hold a user name or password"):
        load_config({"endpoint": "https://user@r.openai.azure.com"}, {})


def test_startup_log_never_shows_endpoint_credentials() -> None:
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        log_startup(Config(endpoint="https://usr9:pa55word@r.openai.azure.com/x"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = "\n".join(formatEvent(event) for event in events)
    assert "upstream https://***@r.openai.azure.com/x" in text
    assert "pa55word" not in text and "usr9" not in text
