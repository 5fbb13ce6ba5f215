"""
Configuration: command-line flags, environment, a TOML file and defaults, merged into one
frozen L{Config}.

Precedence is flags, then environment, then file, then defaults; the model map is merged per
model name (defaults, file, environment, flags).  Everything that is wrong raises
L{ConfigError} naming the option, so the daemon never starts half-configured.  This module
reads files (the config file, key files) but does no network I/O and needs no reactor, so it is
also what SIGHUP calls to reload.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

import attrs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

DEFAULT_API_VERSION = "2024-10-21"
DEFAULT_OPENAI_ENDPOINT = "https://api.openai.com"
DEFAULT_MAX_BODY = 64 * 1024 * 1024

#: Limits on what a client may send and how long it may take (see L{Config}).
DEFAULT_MAX_REQUEST_LINE = 8192
DEFAULT_MAX_HEADER_SIZE = 16384
DEFAULT_MAX_HEADERS = 100
DEFAULT_HEADER_TIMEOUT = 30.0
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_TUNNEL_IDLE_TIMEOUT = 300.0
DEFAULT_MAX_CONNECTIONS = 1024

DEFAULT_MODELS: Mapping[str, str] = MappingProxyType(
    {
        "gpt-3.5-turbo": "gpt-35-turbo",
        "gpt-3.5-turbo-0301": "gpt-35-turbo-0301",
        "gpt-3.5-turbo-0613": "gpt-35-turbo-0613",
        "gpt-3.5-turbo-1106": "gpt-35-turbo-1106",
        "gpt-3.5-turbo-0125": "gpt-35-turbo-0125",
        "gpt-3.5-turbo-16k": "gpt-35-turbo-16k",
        "gpt-3.5-turbo-instruct": "gpt-35-turbo-instruct",
    }
)

DEPLOYMENT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

#: Endpoint-string types we accept in --listen; anything else that looks like host:port is
#: the Go project's address form.
ENDPOINT_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix", "systemd", "tls"})

_GO_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]]*):(?P<port>\d{1,5})$")

Mode = Literal["azure", "openai"]
LogFormat = Literal["text", "json"]


class ConfigError(Exception):
    """
    A configuration problem.  C{str()} is the one line shown to the operator: it names the
    option and says what is wrong, and never contains a key.
    """

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option}: {problem}")
        self.option = option
        self.problem = problem


@attrs.frozen
class Config:
    """
    The whole, validated configuration of a running daemon.  Secrets are kept out of C{repr}.
    """

    listen: tuple[str, ...] = ("tcp:8080",)
    mode: Mode = "azure"
    endpoint: str = ""
    api_version: str = DEFAULT_API_VERSION
    models: Mapping[str, str] = DEFAULT_MODELS
    server_key: str | None = attrs.field(default=None, repr=False)
    client_keys: frozenset[str] = attrs.field(default=frozenset(), repr=False)
    allow_anonymous: bool = False
    forward_allow: tuple[str, ...] = ()
    forward_users: Mapping[str, str] = attrs.field(default=MappingProxyType({}), repr=False)
    config_file: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    log_format: LogFormat = "text"
    drain_timeout: float = 30.0
    keep_filter_frames: bool = False
    connect_timeout: float = 10.0
    upstream_timeout: float = 600.0
    #: Longest request line (method, target, version) in bytes: 414 beyond it.
    max_request_line: int = DEFAULT_MAX_REQUEST_LINE
    #: Longest request head (request line and every header line) in bytes: 431 beyond it.
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE
    #: Most header fields in one request: 431 beyond it.
    max_headers: int = DEFAULT_MAX_HEADERS
    #: Seconds from the first byte of a request head to its end: 408 and close beyond it.
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    #: Seconds a client connection may stay silent between requests (keep-alive) or while
    #: sending a body: closed beyond it.
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    #: Seconds a CONNECT tunnel may stay silent both ways: closed beyond it.
    tunnel_idle_timeout: float = DEFAULT_TUNNEL_IDLE_TIMEOUT
    #: Most open client connections per listener: a 503 (and close) beyond it.
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    @property
    def endpoint_host(self) -> str:
        """The upstream's host name (lower case)."""
        return (urlsplit(self.endpoint).hostname or "").lower()


# Each option: its environment variables (first wins) and its config-file key path.
_ENV: dict[str, tuple[str, ...]] = {
    "listen": ("AZURE_OPENAI_PROXY_ADDRESS",),
    "mode": ("AZURE_OPENAI_PROXY_MODE",),
    "endpoint": ("AZURE_OPENAI_ENDPOINT",),
    "api_version": ("AZURE_OPENAI_APIVERSION", "AZURE_OPENAI_API_VER"),
    "model_mapper": ("AZURE_OPENAI_MODEL_MAPPER",),
    "token": ("AZURE_OPENAI_TOKEN",),
    "client_keys": ("AOAIPROXY_CLIENT_KEYS",),
    "forward_allow": ("AOAIPROXY_FORWARD_ALLOW",),
    "forward_users": ("AOAIPROXY_FORWARD_USERS",),
    "config": ("AOAIPROXY_CONFIG",),
}

_FILE_KEYS = frozenset(
    {
        "listen",
        "mode",
        "endpoint",
        "api_version",
        "models",
        "api_key",
        "api_key_file",
        "client_keys_file",
        "allow_anonymous",
        "forward",
        "max_body",
        "log_format",
        "drain_timeout",
        "keep_filter_frames",
        "connect_timeout",
        "upstream_timeout",
        "max_request_line",
        "max_header_size",
        "max_headers",
        "header_timeout",
        "idle_timeout",
        "tunnel_idle_timeout",
        "max_connections",
    }
)
_FORWARD_KEYS = frozenset({"allow", "users_file"})


def parse_listen(value: str, option: str = "--listen") -> str:
    """
    Turn one listener description into a Twisted server endpoint string.  C{host:port} (the Go
    project's form) becomes C{tcp:port:interface=host}; endpoint strings pass through.
    """
    value = value.strip()
    if not value:
        raise ConfigError(option, "empty listener")
    kind = value.split(":", 1)[0]
    if kind in ENDPOINT_TYPES and ":" in value:
        return value
    m = _GO_ADDRESS.match(value)
    if m is None:
        raise ConfigError(
            option,
            f"{value!r} is neither host:port nor an endpoint string "
            "(tcp:PORT, ssl:PORT:privateKey=...:certKey=..., unix:PATH, systemd:...)",
        )
    port = int(m.group("port"))
    if port > 65535:
        raise ConfigError(option, f"port {port} is out of range")
    host = m.group("host").strip("[]")
    if not host or host in ("0.0.0.0", "::"):
        return f"tcp:{port}" if host != "::" else f"tcp6:{port}"
    host = host.replace(":", "\\:")
    return f"tcp:{port}:interface={host}"


def parse_model_map(value: str, option: str = "--model-mapper") -> dict[str, str]:
    """
    Parse C{model=deployment,model=deployment}.  Empty items are ignored; a pair without C{=}
    or with an empty side is an error.
    """
    out: dict[str, str] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        model, sep, deployment = item.partition("=")
        model, deployment = model.strip(), deployment.strip()
        if not sep or not model or not deployment:
            raise ConfigError(option, f"{item!r} is not a model=deployment pair")
        check_deployment(deployment, option)
        out[model] = deployment
    return out


def check_deployment(deployment: str, option: str) -> None:
    """Raise L{ConfigError} unless C{deployment} is a valid Azure deployment name."""
    if not valid_deployment(deployment):
        raise ConfigError(option, f"deployment {deployment!r} must match [A-Za-z0-9._-]{{1,64}}, not . or ..")


def valid_deployment(deployment: str) -> bool:
    """Whether C{deployment} may appear in an Azure deployment URL path."""
    return DEPLOYMENT_RE.fullmatch(deployment) is not None and deployment not in (".", "..")


def parse_endpoint(value: str, option: str = "--endpoint") -> str:
    """Validate an upstream base URL and return it without a trailing slash."""
    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(option, f"{value!r} is not an http(s) URL")
    if parts.query or parts.fragment:
        raise ConfigError(option, f"{value!r} must not have a query or fragment")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError(option, f"{value!r} has an invalid port") from None
    return value.rstrip("/")


def parse_forward_entry(value: str, option: str = "--forward-allow") -> str:
    """
    Validate one allowlist entry: C{host:port}, C{[v6]:port} or C{*.suffix:port}.  Returned in
    lower case.
    """
    value = value.strip().lower()
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(option, f"{value!r} is not host:port (or *.suffix:port)")
    if host.startswith("*."):
        if len(host) < 3 or "*" in host[2:]:
            raise ConfigError(option, f"{value!r} has a malformed wildcard")
    elif "*" in host:
        raise ConfigError(option, f"{value!r}: a wildcard must be a leading '*.'")
    return value


def read_key_file(path: str, option: str) -> str:
    """Read a file holding one key; surrounding whitespace is not part of it."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(option, f"cannot read {path}: {_reason(e)}") from None
    if not key:
        raise ConfigError(option, f"{path} holds no key")
    return key


def read_lines_file(path: str, option: str) -> list[str]:
    """Read a file of one entry per line, skipping blank lines and C{#} comments."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(option, f"cannot read {path}: {_reason(e)}") from None
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _reason(e: Exception) -> str:
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    return type(e).__name__


def _number(value: Any, option: str, *, integer: bool = False) -> float:
    if isinstance(value, bool):
        raise ConfigError(option, f"{value!r} is not a number")
    try:
        n = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise ConfigError(option, f"{value!r} is not a {'whole ' if integer else ''}number") from None
    if n < 0 or n != n or n == float("inf"):
        raise ConfigError(option, f"{value!r} must be a positive number")
    return n


def _boolean(value: Any, option: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(option, f"{value!r} is not true or false")


def _string_list(value: Any, option: str) -> list[str]:
    if isinstance(value, str):
        return [v for v in (s.strip() for s in value.split(",")) if v]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ConfigError(option, "must be a list of strings")


def _string(value: Any, option: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(option, f"{value!r} is not a string")
    return value


def read_config_file(path: str) -> dict[str, Any]:
    """Read and check the keys of a TOML config file."""
    option = "--config"
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except OSError as e:
        raise ConfigError(option, f"cannot read {path}: {_reason(e)}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(option, f"{path} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        raise ConfigError(option, f"{path}: unknown key {unknown[0]!r}")
    forward = data.get("forward", {})
    if not isinstance(forward, dict):
        raise ConfigError(option, f"{path}: [forward] must be a table")
    unknown = sorted(set(forward) - _FORWARD_KEYS)
    if unknown:
        raise ConfigError(option, f"{path}: unknown key 'forward.{unknown[0]}'")
    models = data.get("models", {})
    if not isinstance(models, dict) or not all(isinstance(v, str) for v in models.values()):
        raise ConfigError(option, f"{path}: [models] must map model names to deployment names")
    return data


def load_config(flags: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    """
    Build the configuration.

    @param flags: options given on the command line, by option name with dashes as
        underscores (C{listen} is a list, C{forward_allow} a list, booleans are C{True} when
        given).  Options not given are absent.
    @param env: the process environment.
    """

    def from_env(name: str) -> str | None:
        for var in _ENV.get(name, ()):
            if var in env and env[var] != "":
                return env[var]
        return None

    config_path = flags.get("config") or from_env("config")
    file: dict[str, Any] = read_config_file(config_path) if config_path else {}
    forward_file: dict[str, Any] = file.get("forward", {})

    def pick(name: str, file_key: str | None = None, section: Mapping[str, Any] = file) -> Any:
        """Flag, then environment, then file; None if none."""
        if flags.get(name) not in (None, [], ()):
            return flags[name]
        e = from_env(name)
        if e is not None:
            return e
        return section.get(file_key or name)

    # mode
    mode: Mode = pick("mode") or "azure"
    if mode not in ("azure", "openai"):
        raise ConfigError("--mode", f"{mode!r} is not azure or openai")

    # endpoint
    raw_endpoint = pick("endpoint")
    if raw_endpoint is None:
        if mode == "azure":
            raise ConfigError(
                "--endpoint",
                "required in azure mode (https://RESOURCE.openai.azure.com, or AZURE_OPENAI_ENDPOINT)",
            )
        raw_endpoint = DEFAULT_OPENAI_ENDPOINT
    endpoint = parse_endpoint(_string(raw_endpoint, "--endpoint"))

    # listeners
    raw_listen = pick("listen")
    listen_values = _string_list(raw_listen, "--listen") if raw_listen else ["tcp:8080"]
    listen = tuple(parse_listen(v) for v in listen_values)
    if not listen:
        raise ConfigError("--listen", "no listener given")

    api_version = _string(pick("api_version") or DEFAULT_API_VERSION, "--api-version").strip()
    if not re.fullmatch(r"[0-9A-Za-z._-]{1,40}", api_version):
        raise ConfigError("--api-version", f"{api_version!r} is not an API version")

    # models, merged per name
    models = dict(DEFAULT_MODELS)
    for model, deployment in file.get("models", {}).items():
        check_deployment(deployment, "[models]")
        models[model] = deployment
    env_map = from_env("model_mapper")
    if env_map is not None:
        models.update(parse_model_map(env_map, "AZURE_OPENAI_MODEL_MAPPER"))
    for value in flags.get("model_mapper") or []:
        models.update(parse_model_map(value))

    # keys
    server_key: str | None = None
    if flags.get("token"):
        server_key = _string(flags["token"], "--token").strip()
    elif flags.get("token_file"):
        server_key = read_key_file(flags["token_file"], "--token-file")
    elif from_env("token"):
        server_key = (from_env("token") or "").strip()
    elif file.get("api_key") is not None:
        server_key = _string(file["api_key"], "api_key").strip()
    elif file.get("api_key_file") is not None:
        server_key = read_key_file(_string(file["api_key_file"], "api_key_file"), "api_key_file")
    if server_key == "":
        raise ConfigError("--token", "the server key is empty")

    client_keys_path = pick("client_keys", "client_keys_file")
    client_keys: frozenset[str] = frozenset()
    if client_keys_path:
        client_keys = frozenset(read_lines_file(_string(client_keys_path, "--client-keys"), "--client-keys"))
        if not client_keys:
            raise ConfigError("--client-keys", f"{client_keys_path} holds no key")

    allow_anonymous = _boolean(
        flags.get("allow_anonymous") or file.get("allow_anonymous", False), "--allow-anonymous"
    )
    if server_key and not client_keys and not allow_anonymous:
        raise ConfigError(
            "--token",
            "a server key without --client-keys would let anyone use it; give --client-keys, "
            "or --allow-anonymous if an open relay is intended",
        )

    # forward proxy
    raw_allow = pick("forward_allow", "allow", forward_file)
    if raw_allow is None:
        allow = ["api.openai.com:443"]
        if mode == "azure" or urlsplit(endpoint).hostname != "api.openai.com":
            host = urlsplit(endpoint).hostname or ""
            allow.append(f"{host}:443" if ":" not in host else f"[{host}]:443")
    else:
        allow = _string_list(raw_allow, "--forward-allow")
    if [a.strip().lower() for a in allow] == ["none"]:
        forward_allow: tuple[str, ...] = ()
    else:
        forward_allow = tuple(dict.fromkeys(parse_forward_entry(a) for a in allow))

    users_path = pick("forward_users", "users_file", forward_file)
    forward_users: dict[str, str] = {}
    if users_path:
        for line in read_lines_file(_string(users_path, "--forward-users"), "--forward-users"):
            user, sep, password = line.partition(":")
            if not sep or not user:
                raise ConfigError("--forward-users", "each line must be user:password")
            forward_users[user] = password

    def num(name: str) -> float:
        """A numeric option; its default and whether it is whole come from L{Config}."""
        default = _DEFAULTS[name]
        value = pick(name)
        if value is None:
            return float(default)
        return _number(value, "--" + name.replace("_", "-"), integer=isinstance(default, int))

    max_body = int(num("max_body"))
    if max_body < 1:
        raise ConfigError("--max-body", "must be at least 1 byte")

    log_format: LogFormat = pick("log_format") or "text"
    if log_format not in ("text", "json"):
        raise ConfigError("--log-format", f"{log_format!r} is not text or json")

    connect_timeout = num("connect_timeout")
    upstream_timeout = num("upstream_timeout")
    header_timeout = num("header_timeout")
    idle_timeout = num("idle_timeout")
    tunnel_idle_timeout = num("tunnel_idle_timeout")
    for name, value in (
        ("--connect-timeout", connect_timeout),
        ("--upstream-timeout", upstream_timeout),
        ("--header-timeout", header_timeout),
        ("--idle-timeout", idle_timeout),
        ("--tunnel-idle-timeout", tunnel_idle_timeout),
    ):
        if value <= 0:
            raise ConfigError(name, "must be more than 0 seconds")

    max_request_line = int(num("max_request_line"))
    max_header_size = int(num("max_header_size"))
    max_headers = int(num("max_headers"))
    max_connections = int(num("max_connections"))
    for name, value, least in (
        ("--max-request-line", max_request_line, 16),
        ("--max-header-size", max_header_size, 64),
        ("--max-headers", max_headers, 1),
        ("--max-connections", max_connections, 1),
    ):
        if value < least:
            raise ConfigError(name, f"must be at least {least}")

    return Config(
        listen=listen,
        mode=mode,
        endpoint=endpoint,
        api_version=api_version,
        models=MappingProxyType(models),
        server_key=server_key,
        client_keys=client_keys,
        allow_anonymous=allow_anonymous,
        forward_allow=forward_allow,
        forward_users=MappingProxyType(forward_users),
        config_file=config_path,
        max_body=max_body,
        log_format=log_format,
        drain_timeout=num("drain_timeout"),
        keep_filter_frames=_boolean(
            flags.get("keep_filter_frames") or file.get("keep_filter_frames", False),
            "--keep-filter-frames",
        ),
        connect_timeout=connect_timeout,
        upstream_timeout=upstream_timeout,
        max_request_line=max_request_line,
        max_header_size=max_header_size,
        max_headers=max_headers,
        header_timeout=header_timeout,
        idle_timeout=idle_timeout,
        tunnel_idle_timeout=tunnel_idle_timeout,
        max_connections=max_connections,
    )


#: Each option's default, from L{Config} itself.
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in attrs.fields(Config)}


class LiveConfig:
    """
    The one mutable cell: the configuration in force.  A reload swaps it whole, so each
    request sees one consistent L{Config}; requests already running keep theirs.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
