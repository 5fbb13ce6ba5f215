"""
Configuration: command-line flags, environment, a TOML file and defaults, merged into one
frozen L{Config}.

Each option is declared once, as a field of L{Config} (L{aoaiproxy.options.option}); twistd's
option tables, the environment and file reading, C{--help} and the README's options table are
generated from those declarations.  Precedence is flags, then environment, then file, then
defaults; the model map is merged per model name (defaults, file, environment, flags).
Everything that is wrong raises L{ConfigError} naming the option, so the daemon never starts
half-configured.  This module reads files (the config file, key files) but does no network
I/O and needs no reactor, so it is also what SIGHUP calls to reload.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

import attrs

from aoaiproxy.capacity import connections_for, open_file_limit
from aoaiproxy.options import (
    ConfigError,
    Given,
    Option,
    Sources,
    boolean,
    check_file_keys,
    choice,
    file_keys,
    key_table,
    number,
    option,
    options_of,
    readme_table,
    text,
    type_name,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "BACKEND_OPTIONS",
    "OPTIONS",
    "RESTART_ONLY",
    "BackendConfig",
    "Config",
    "ConfigError",
    "LiveConfig",
    "backend_table",
    "load_config",
    "options_table",
]

DEFAULT_API_VERSION = "2024-10-21"
DEFAULT_OPENAI_ENDPOINT = "https://api.openai.com"
DEFAULT_MAX_BODY = 64 * 1024 * 1024
DEFAULT_ENTRA_SCOPE = "https://cognitiveservices.azure.com/.default"
DEFAULT_INTERCEPT_HOST = "api.openai.com:443"

#: Limits on what a client may send and how long it may take (see L{Config}).
DEFAULT_MAX_REQUEST_LINE = 8192
DEFAULT_MAX_HEADER_SIZE = 16384
DEFAULT_MAX_HEADERS = 100
DEFAULT_HEADER_TIMEOUT = 30.0
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_TUNNEL_IDLE_TIMEOUT = 300.0

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

#: Names of backends and of client keys: they appear in logs, metrics and headers.
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

#: Endpoint-string types we accept in --listen; anything else that looks like host:port is
#: the Go project's address form.
ENDPOINT_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix", "systemd", "tls"})

_GO_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]]*):(?P<port>\d{1,5})$")

Mode = Literal["azure", "openai"]
LogFormat = Literal["text", "json"]
Auth = Literal["key", "entra"]
BackendAuth = Literal["key", "entra", "client"]


# -- parsers of single values -----------------------------------------------------------------


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


def redact_url(url: str) -> str:
    """C{url} with any user information (C{user:password@}) replaced by C{***@}."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}{sep}{authority}{tail}"


def parse_endpoint(value: str, option: str = "--endpoint") -> str:
    """
    Validate an upstream base URL and return it without a trailing slash.  A user name or
    password in it is refused (credentials go in key files), and never shown.
    """
    value = value.strip()
    shown = redact_url(value)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(option, f"{shown!r} is not an http(s) URL")
    if "@" in parts.netloc:
        raise ConfigError(
            option, f"{shown!r} must not hold a user name or password (give the key in a key file)"
        )
    if parts.query or parts.fragment:
        raise ConfigError(option, f"{shown!r} must not have a query or fragment")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError(option, f"{shown!r} has an invalid port") from None
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


_HOST_PORT = re.compile(r"(?P<host>[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|\[[0-9a-f:.]+\])(:(?P<port>\d{1,5}))?")


def parse_host(value: str, option: str) -> str:
    """A C{host} or C{host:port} (C{[v6]:port}), as C{host:port} in lower case; port 443 if none."""
    value = value.strip().lower()
    m = _HOST_PORT.fullmatch(value)
    port = int(m.group("port") or 443) if m else 0
    if m is None or ".." in value or not 0 < port < 65536:
        raise ConfigError(option, f"{value!r} is not a host or host:port")
    return f"{m.group('host')}:{port}"


def _entries(path: str, option: str) -> list[tuple[int, str]]:
    """The lines of a file that are not blank or C{#} comments, with their line numbers."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(option, f"cannot read {path}: {_reason(e)}") from None
    entries = []
    for line_number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append((line_number, line))
    return entries


def read_lines_file(path: str, option: str) -> list[str]:
    """Read a file of one entry per line, skipping blank lines and C{#} comments."""
    return [line for _, line in _entries(path, option)]


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


def _reason(e: Exception) -> str:
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    return type(e).__name__


# -- parsers of options (value, label) --------------------------------------------------------


def _path(value: Any, label: str) -> str:
    path = text(value, label)
    if not path:
        raise ConfigError(label, "is empty")
    return path


def _key(value: Any, label: str) -> str:
    """A key (secret): never shown, whatever it is."""
    key = text(value, label)
    if not key:
        raise ConfigError(label, "the key is empty")
    return key


def _key_file(value: Any, label: str) -> str:
    return read_key_file(_path(value, label), label)


def _listeners(values: list[str], label: str) -> tuple[str, ...]:
    if not values:
        raise ConfigError(label, "no listener given")
    return tuple(parse_listen(v, label) for v in values)


def _endpoint(value: Any, label: str) -> str:
    return parse_endpoint(text(value, label), label)


def _api_version(value: Any, label: str) -> str:
    version = text(value, label)
    if not re.fullmatch(r"[0-9A-Za-z._-]{1,40}", version):
        raise ConfigError(label, f"{version!r} is not an API version")
    return version


def _model_table(value: Any, label: str) -> dict[str, str]:
    """A C{MAP} string, or a TOML table of model names to deployment names."""
    if isinstance(value, str):
        return parse_model_map(value, label)
    if not isinstance(value, dict):
        raise ConfigError(
            label, f"must be a table of model names to deployment names, not {type_name(value)}"
        )
    for model, deployment in value.items():
        if not isinstance(deployment, str):
            raise ConfigError(f"{label}.{model}", f"must be a deployment name, not {type_name(deployment)}")
        check_deployment(deployment, label)
    return dict(value)


def _client_keys(value: Any, label: str) -> Mapping[str, str]:
    """
    A client-keys file: one key a line, optionally C{NAME:KEY}; C{#} comments.  Returns each
    key's name; an unnamed key is named C{keyN}, N its place among the keys.
    """
    path = _path(value, label)
    names: dict[str, str] = {}
    for place, (line_number, line) in enumerate(_entries(path, label), 1):
        name, sep, key = line.partition(":")
        where = f"{path} line {line_number}"
        if sep:
            name, key = name.strip(), key.strip()
            if not NAME_RE.fullmatch(name):
                raise ConfigError(label, f"{where}: the name before ':' must match [A-Za-z0-9_.-]{{1,64}}")
            if not key:
                raise ConfigError(label, f"{where}: no key after {name}:")
        else:
            key, name = line, f"key{place}"
        if key in names:
            raise ConfigError(label, f"{where}: the same key as {names[key]}")
        if name in names.values():
            raise ConfigError(
                label, f"{where}: the name {name} is taken (unnamed keys are keyN, N their place)"
            )
        names[key] = name
    if not names:
        raise ConfigError(label, f"{path} holds no key")
    return MappingProxyType(names)


def _forward_allow(values: list[str], label: str) -> tuple[str, ...]:
    if [v.lower() for v in values] == ["none"]:
        return ()
    return tuple(dict.fromkeys(parse_forward_entry(v, label) for v in values))


def _forward_users(value: Any, label: str) -> Mapping[str, str]:
    users: dict[str, str] = {}
    for line in read_lines_file(_path(value, label), label):
        user, sep, password = line.partition(":")
        if not sep or not user:
            raise ConfigError(label, "each line must be user:password")
        users[user] = password
    return MappingProxyType(users)


def _intercept_hosts(values: list[str], label: str) -> tuple[str, ...]:
    hosts = [parse_host(v, label) for v in values]
    for host in hosts:
        if host.startswith("["):  # an IPv6 literal, as a CONNECT names it
            try:
                ipaddress.IPv6Address(host[1:].rpartition("]")[0])
            except ValueError:
                raise ConfigError(label, f"{host!r} is not an IPv6 address in brackets") from None
    return tuple(dict.fromkeys([DEFAULT_INTERCEPT_HOST, *hosts]))


def _optional_listener(value: Any, label: str) -> str:
    return parse_listen(text(value, label), label)


def _workers(value: Any, label: str) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return usable_cpus()
    try:
        return int(number(integer=True, least=1)(value, label))
    except ConfigError as e:
        raise ConfigError(label, f"{e.problem} (or auto)") from None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, e.g. C{taskset}), else all of them."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return len(affinity(0)) or 1
    return os.cpu_count() or 1


def _state_dir(value: Any, label: str) -> str:
    return os.path.expanduser(_path(value, label))


def default_state_dir(env: Mapping[str, str]) -> str:
    """C{~/.local/state/aoaiproxy} of the user in C{env} (C{$HOME}), when no state dir is given."""
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".local", "state", "aoaiproxy")


def _whole(**bounds: Any) -> Any:
    parse = number(integer=True, **bounds)
    return lambda value, label: int(parse(value, label))


# -- backends ---------------------------------------------------------------------------------


@attrs.frozen
class BackendConfig:
    """
    One upstream Azure resource (SPEC §11).  C{auth} C{key} sends C{api_key}, C{entra} an
    Entra ID token for C{entra_scope}, C{client} the client's own key (no server credential:
    the one-backend form without C{--token}).  C{models} maps model to deployment; None means
    every model, through the global model map.
    """

    name: str
    endpoint: str
    api_key: str | None = attrs.field(default=None, repr=False)
    auth: BackendAuth = "client"
    priority: int = 0
    weight: int = 1
    models: Mapping[str, str] | None = None
    entra_scope: str = DEFAULT_ENTRA_SCOPE


def _name(value: Any, label: str) -> str:
    name = text(value, label)
    if not NAME_RE.fullmatch(name):
        raise ConfigError(label, "must match [A-Za-z0-9_.-]{1,64}")
    return name


def _integer(value: Any, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(label, f"must be a whole number, not {type_name(value)}")
    return value


def _backend_models(value: Any, label: str) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(label, f"must be a table of model = deployment, not {type_name(value)}")
    models = _model_table(value, label)
    if not models:
        raise ConfigError(label, "is empty: the backend would serve no model (leave it out for every model)")
    return MappingProxyType(models)


#: The keys of a C{[[backend]]} table, declared as options are (file only).
BACKEND_OPTIONS: tuple[Option, ...] = (
    Option(
        name="name",
        key="name",
        parse=_name,
        default_text="required",
        help="Unique, ``[A-Za-z0-9_.-]{1,64}``: in logs, metrics and the ``x-aoaiproxy-backend`` header",
    ),
    Option(
        name="endpoint",
        key="endpoint",
        parse=_endpoint,
        default_text="required",
        help="The resource's URL, ``https://RESOURCE.openai.azure.com``",
    ),
    Option(
        name="api_key",
        key="api_key",
        file_key="api_key_file",
        read_file=_key_file,
        parse=_key,
        secret=True,
        default_text="none",
        help='The resource\'s key, or a file holding it (or ``auth = "entra"``: exactly one of the three)',
    ),
    Option(
        name="auth",
        key="auth",
        parse=choice("key", "entra"),
        default_text="``key``",
        help="``entra``: Entra ID tokens instead of a key",
    ),
    Option(
        name="entra_scope",
        key="entra_scope",
        parse=_path,
        default_text="the global ``entra_scope``",
        help="The scope of this backend's Entra ID tokens",
    ),
    Option(
        name="priority",
        key="priority",
        parse=_integer,
        default_text="0",
        help="Lower is preferred; higher ones only when every lower one is unavailable",
    ),
    Option(
        name="weight",
        key="weight",
        parse=_whole(least=1),
        default_text="1",
        help="Share among the available backends of one priority",
    ),
    Option(
        name="models",
        key="models",
        parse=_backend_models,
        default_text="every model, through ``[models]``",
        help="Table of model = deployment on this resource",
    ),
)
_BACKEND_KEYS = file_keys(BACKEND_OPTIONS)


def _backend(table: Any, place: int, taken: set[str]) -> BackendConfig:
    """One C{[[backend]]} table; C{taken} holds the names of those before it."""
    if not isinstance(table, dict):
        raise ConfigError(f"backend[{place}]", f"must be a table, not {type_name(table)}")
    if "name" not in table:
        raise ConfigError(f"backend[{place}].name", "is missing")
    name = _name(table["name"], f"backend[{place}].name")
    here = f"backend[{name}]"
    if name in taken:
        raise ConfigError(f"{here}.name", "is used by an earlier backend; names must be unique")
    for key in table:
        if key not in _BACKEND_KEYS:
            raise ConfigError(f"{here}.{key}", "unknown key")
    if "endpoint" not in table:
        raise ConfigError(f"{here}.endpoint", "is missing")
    sources = Sources({}, {}, table, prefix=f"{here}.")
    values = {o.name: given.value for o in BACKEND_OPTIONS if (given := sources.get(o)) is not None}

    credentials = [k for k in ("api_key", "api_key_file") if k in table]
    if values.get("auth") == "entra":
        credentials.append('auth = "entra"')
    if len(credentials) != 1:
        raise ConfigError(
            here,
            'needs exactly one credential: api_key_file, api_key or auth = "entra" '
            + (f"(it has {' and '.join(credentials)})" if credentials else "(it has none)"),
        )
    values.setdefault("auth", "key")
    values.setdefault("entra_scope", "")  # the global one, once it is known
    return BackendConfig(**values)


def _backends(value: Any, label: str) -> tuple[BackendConfig, ...]:
    """The C{[[backend]]} tables (an entra backend without C{entra_scope} gets the global one)."""
    if not isinstance(value, list) or not value:
        raise ConfigError(label, "must be one or more [[backend]] tables")
    backends: list[BackendConfig] = []
    for place, table in enumerate(value, 1):
        backends.append(_backend(table, place, {b.name for b in backends}))
    return tuple(backends)


def _default_backend(config: Config) -> tuple[BackendConfig, ...]:
    """The one-backend form's backend, C{default}, from C{endpoint}, the server key and C{auth}."""
    if not config.endpoint:
        return ()
    auth: BackendAuth = "key" if config.server_key else ("entra" if config.auth == "entra" else "client")
    return (
        BackendConfig(
            name="default",
            endpoint=config.endpoint,
            api_key=config.server_key,
            auth=auth,
            entra_scope=config.entra_scope,
        ),
    )


# -- the options ------------------------------------------------------------------------------


@attrs.frozen
class Config:
    """
    The whole, validated configuration of a running daemon; each option field is also the
    option's declaration (L{aoaiproxy.options.option}).  Secrets are kept out of C{repr}.

    Adding an option is adding a field here: its flag, environment variable and config key
    work at once, C{--help} shows it, and C{tests/test_options.py} asks for a command-line
    case and for the README's table (C{print(options_table())}) to be updated.  Rules between
    options (a default that depends on another, a combination refused) go in L{_derive}.
    """

    listen: tuple[str, ...] = option(
        default=("tcp:8080",),
        kind="list",
        metavar="ENDPOINT",
        env=("AZURE_OPENAI_PROXY_ADDRESS",),
        parse=_listeners,
        reload=False,
        default_text="``tcp:8080`` (all interfaces)",
        help="""Listen on this endpoint: ``tcp:8080:interface=127.0.0.1``,
        ``ssl:8443:privateKey=key.pem:certKey=cert.pem``, ``unix:PATH``,
        ``systemd:domain=INET:name=N``, or ``host:port``""",
    )
    mode: Mode = option(
        default="azure",
        metavar="azure|openai",
        env=("AZURE_OPENAI_PROXY_MODE",),
        parse=choice("azure", "openai"),
        help="Convert requests to Azure OpenAI (azure), or relay them unchanged (openai)",
    )
    endpoint: str = option(
        default="",
        metavar="URL",
        env=("AZURE_OPENAI_ENDPOINT",),
        parse=_endpoint,
        default_text=(
            "required in azure mode (without ``[[backend]]``); ``https://api.openai.com`` in openai mode"
        ),
        help="Upstream base URL: ``https://RESOURCE.openai.azure.com`` in azure mode",
    )
    api_version: str = option(
        default=DEFAULT_API_VERSION,
        metavar="V",
        env=("AZURE_OPENAI_APIVERSION", "AZURE_OPENAI_API_VER"),
        parse=_api_version,
        default_text=f"``{DEFAULT_API_VERSION}``",
        help="Azure api-version of the per-deployment routes",
    )
    models: Mapping[str, str] = option(
        default=DEFAULT_MODELS,
        kind="table",
        flag="model-mapper",
        metavar="MAP",
        env=("AZURE_OPENAI_MODEL_MAPPER",),
        parse=_model_table,
        default_text="``gpt-3.5-turbo=gpt-35-turbo`` and its dated variants",
        help="""``model=deployment`` pairs, comma-separated; extend and override the defaults, model
        by model""",
    )
    server_key: str | None = option(
        default=None,
        flag="token",
        metavar="KEY",
        env=("AZURE_OPENAI_TOKEN",),
        key="api_key",
        file_flag="token-file",
        file_key="api_key_file",
        read_file=_key_file,
        parse=_key,
        secret=True,
        default_text="none",
        help="Server key sent upstream instead of the client's (prefer ``--token-file``)",
    )
    auth: Auth = option(
        default="key",
        metavar="key|entra",
        env=("AZURE_OPENAI_AUTH",),
        parse=choice("key", "entra"),
        help="""How the one-backend form authenticates upstream: with a key (the server key, or
        the client's without one), or with Entra ID tokens""",
    )
    entra_scope: str = option(
        default=DEFAULT_ENTRA_SCOPE,
        parse=_path,
        default_text=f"``{DEFAULT_ENTRA_SCOPE}``",
        help="The scope Entra ID tokens are requested for",
        flag=None,
    )
    backends: tuple[BackendConfig, ...] = option(
        default=attrs.Factory(_default_backend, takes_self=True),
        kind="tables",
        key="backend",
        parse=_backends,
        default_text="one backend, ``default``, from ``--endpoint`` and its credential",
        help="Several Azure resources, with failover and cooldown",
        flag=None,
    )
    #: The client keys: those of C{client_names} (which names each).
    client_keys: frozenset[str] = attrs.field(default=frozenset(), repr=False)
    client_names: Mapping[str, str] = option(
        default=MappingProxyType({}),
        flag="client-keys",
        metavar="PATH",
        env=("AOAIPROXY_CLIENT_KEYS",),
        key="client_keys_file",
        parse=_client_keys,
        secret=True,
        default_text="none",
        help="""File of the client keys that may use the server credential, one a line,
        optionally ``NAME:KEY``""",
    )
    allow_anonymous: bool = option(
        default=False,
        kind="flag",
        parse=boolean,
        help="With a server credential and no client keys, let anyone use it (an open relay)",
    )
    forward_allow: tuple[str, ...] = option(
        default=(),
        kind="list",
        metavar="HOST:PORT",
        env=("AOAIPROXY_FORWARD_ALLOW",),
        key="forward.allow",
        parse=_forward_allow,
        note="``none`` turns forwarding off",
        default_text="``api.openai.com:443`` and the Azure endpoint's ``host:443``",
        help="Destination the forward proxy may reach, ``host:port`` or ``*.suffix:port``",
    )
    forward_users: Mapping[str, str] = option(
        default=MappingProxyType({}),
        metavar="PATH",
        env=("AOAIPROXY_FORWARD_USERS",),
        key="forward.users_file",
        parse=_forward_users,
        secret=True,
        default_text="none (no proxy authentication)",
        help="File of ``user:password`` lines for proxy authentication",
    )
    config_file: str | None = option(
        default=None,
        flag="config",
        metavar="PATH",
        env=("AOAIPROXY_CONFIG",),
        parse=_path,
        default_text="none",
        help="TOML config file",
        key=None,
    )
    max_body: int = option(
        default=DEFAULT_MAX_BODY,
        metavar="BYTES",
        parse=_whole(least=1, unit="byte"),
        default_text="67108864 (64 MiB)",
        help="Largest request body in bytes",
    )
    log_format: LogFormat = option(
        default="text",
        metavar="text|json",
        parse=choice("text", "json"),
        reload=False,
        help="Log lines as text, or as one JSON object a line",
    )
    drain_timeout: float = option(
        default=30.0,
        metavar="SECONDS",
        parse=number(),
        help="Seconds to let requests in flight finish on SIGTERM",
    )
    keep_filter_frames: bool = option(
        default=False,
        kind="flag",
        parse=boolean,
        help="Keep Azure's filter-only SSE frames (dropped by default)",
    )
    connect_timeout: float = option(
        default=10.0,
        metavar="SECONDS",
        parse=number(above_zero=True),
        help="Seconds to connect upstream",
    )
    upstream_timeout: float = option(
        default=600.0,
        metavar="SECONDS",
        parse=number(above_zero=True),
        help="Longest wait for upstream response headers, and longest silence inside a body",
    )
    #: Longest request line (method, target, version) in bytes: 414 beyond it.
    max_request_line: int = option(
        default=DEFAULT_MAX_REQUEST_LINE,
        metavar="BYTES",
        parse=_whole(least=16),
        default_text=str(DEFAULT_MAX_REQUEST_LINE),
        help="Longest request line in bytes; longer gets 414",
    )
    #: Longest request head (request line and every header line) in bytes: 431 beyond it.
    max_header_size: int = option(
        default=DEFAULT_MAX_HEADER_SIZE,
        metavar="BYTES",
        parse=_whole(least=64),
        default_text=f"{DEFAULT_MAX_HEADER_SIZE} (16 KiB)",
        help="Longest request head (request line and headers) in bytes; longer gets 431",
    )
    #: Most header fields in one request: 431 beyond it.
    max_headers: int = option(
        default=DEFAULT_MAX_HEADERS,
        metavar="N",
        parse=_whole(least=1),
        default_text=str(DEFAULT_MAX_HEADERS),
        help="Most header fields in a request; more gets 431",
    )
    #: Seconds from the first byte of a request head to its end: 408 and close beyond it.
    header_timeout: float = option(
        default=DEFAULT_HEADER_TIMEOUT,
        metavar="SECONDS",
        parse=number(above_zero=True),
        default_text=f"{DEFAULT_HEADER_TIMEOUT:g}",
        help="Seconds a client may take to send a request head; slower gets 408 and is disconnected",
    )
    #: Seconds a client connection may stay silent between requests (keep-alive) or while
    #: sending a body: closed beyond it.
    idle_timeout: float = option(
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        parse=number(above_zero=True),
        default_text=f"{DEFAULT_IDLE_TIMEOUT:g}",
        help="""Seconds a client connection may stay silent between requests (keep-alive) or
        inside a request body before it is closed""",
    )
    #: Seconds a CONNECT tunnel may stay silent both ways: closed beyond it.
    tunnel_idle_timeout: float = option(
        default=DEFAULT_TUNNEL_IDLE_TIMEOUT,
        metavar="SECONDS",
        parse=number(above_zero=True),
        default_text=f"{DEFAULT_TUNNEL_IDLE_TIMEOUT:g}",
        help="Seconds a CONNECT tunnel may stay silent both ways before it is closed",
    )
    #: Most open client connections of one process (each worker's own): a 503 (and close)
    #: beyond it.  By default what the open-file limit carries (L{aoaiproxy.capacity}).
    max_connections: int = option(
        default=attrs.Factory(lambda: connections_for(open_file_limit())),
        metavar="N",
        parse=_whole(least=1),
        default_text="(open-file limit - 100) // 2 (9950 with 20,000 descriptors)",
        help="""Most open client connections per process (each worker its own); more get 503
        and are closed.  The default leaves a client and an upstream descriptor to each, of the
        hard open-file limit (the daemon raises its soft limit to it at start)""",
    )
    max_attempts: int = option(
        default=3,
        metavar="N",
        parse=_whole(least=1),
        help="Most backends one request is tried on (failover)",
    )
    max_cooldown: float = option(
        default=60.0,
        metavar="SECONDS",
        parse=number(above_zero=True),
        help="Longest time a backend is kept out after a 429 or repeated failures",
    )
    intercept: bool = option(
        default=False,
        kind="flag",
        key="intercept.enabled",
        parse=boolean,
        reload=False,
        help="""Serve CONNECTs to ``api.openai.com:443`` (and ``[intercept] hosts``) as API requests,
        with TLS from the proxy's own CA (azure mode)""",
    )
    intercept_hosts: tuple[str, ...] = option(
        default=(DEFAULT_INTERCEPT_HOST,),
        kind="list",
        key="intercept.hosts",
        parse=_intercept_hosts,
        default_text=f"``{DEFAULT_INTERCEPT_HOST}`` only (a host without a port is on 443)",
        help="Further hosts to intercept: ``host`` or ``host:port``",
        flag=None,
    )
    intercept_ca_cert: str | None = option(
        default=None,
        key="intercept.ca_cert",
        parse=_path,
        default_text="generated in the state directory (``ca.pem``)",
        help="The interception CA's certificate (PEM), given with ``ca_key``",
        flag=None,
    )
    intercept_ca_key: str | None = option(
        default=None,
        key="intercept.ca_key",
        parse=_path,
        default_text="generated in the state directory (``ca-key.pem``)",
        help="The interception CA's private key (PEM), given with ``ca_cert``",
        flag=None,
    )
    state_dir: str = option(
        default=attrs.Factory(lambda: default_state_dir(os.environ)),
        metavar="PATH",
        env=("STATE_DIRECTORY",),
        parse=_state_dir,
        env_default=default_state_dir,
        reload=False,
        default_text="``$STATE_DIRECTORY``, else ``~/.local/state/aoaiproxy``",
        help="Directory of files the daemon keeps (the generated CA)",
    )
    metrics_listen: str | None = option(
        default=None,
        metavar="ENDPOINT",
        parse=_optional_listener,
        reload=False,
        default_text="off",
        help="Serve Prometheus metrics at ``/metrics`` on this endpoint (as ``--listen``)",
    )
    workers: int = option(
        default=1,
        metavar="N|auto",
        parse=_workers,
        reload=False,
        help="""Worker processes sharing the listeners, each a whole proxy, supervised by the
        daemon's first process (``auto``: one per CPU it may use)""",
    )

    @property
    def endpoint_host(self) -> str:
        """The upstream's host name (lower case)."""
        return (urlsplit(self.endpoint).hostname or "").lower()


#: Every option, in the order of C{--help} and the README.
OPTIONS: tuple[Option, ...] = options_of(Config)
_BY_NAME = {o.name: o for o in OPTIONS}

#: Settings a reload cannot change (the listeners are bound, the log observer installed, ...).
RESTART_ONLY: tuple[str, ...] = tuple(o.name for o in OPTIONS if not o.reload)


def options_table() -> str:
    """The README's options table (reStructuredText), generated from L{OPTIONS}."""
    return readme_table(OPTIONS)


def backend_table() -> str:
    """The README's table of C{[[backend]]} keys, generated from L{BACKEND_OPTIONS}."""
    return key_table(BACKEND_OPTIONS)


# -- loading ----------------------------------------------------------------------------------


def read_config_file(path: str) -> dict[str, Any]:
    """Read a TOML config file and refuse keys no option declares."""
    option = "--config"
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except OSError as e:
        raise ConfigError(option, f"cannot read {path}: {_reason(e)}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(option, f"{path} is not valid TOML: {e}") from None
    check_file_keys(data, OPTIONS, path)
    return data


def load_config(flags: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    """
    Build the configuration.

    @param flags: options given on the command line, by flag with dashes as underscores
        (C{listen} is a list, C{forward_allow} a list, booleans are C{True} when given).
        Options not given are absent.
    @param env: the process environment.
    """
    found = Sources(flags, env, {}).get(_BY_NAME["config_file"])
    document = read_config_file(found.value) if found else {}
    sources = Sources(flags, env, document)
    given: dict[str, Given] = {}
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        value = sources.get(opt)
        if value is not None:
            given[opt.name] = value
            values[opt.name] = value.value
        elif opt.env_default is not None:
            values[opt.name] = opt.env_default(env)
        if opt.kind == "table" and opt.name in values:
            default = attrs.fields_dict(Config)[opt.name].default
            assert isinstance(default, Mapping)
            values[opt.name] = MappingProxyType({**default, **values[opt.name]})
    _derive(values, given)
    return Config(**values)


def _derive(values: dict[str, Any], given: Mapping[str, Given]) -> None:
    """What depends on several options: the backends, defaults and the rules between them."""
    mode = values.get("mode", "azure")

    if "backends" in given:
        for name in ("endpoint", "server_key", "auth"):
            if name in given:
                raise ConfigError(
                    given[name].label,
                    "is the one-backend form; with [[backend]] tables give each backend's endpoint "
                    "and credential there (use one form, not both)",
                )
        if mode != "azure":
            raise ConfigError("backend", "[[backend]] tables are for azure mode")
        scope = values.get("entra_scope", DEFAULT_ENTRA_SCOPE)
        backends = tuple(
            b if b.entra_scope else attrs.evolve(b, entra_scope=scope) for b in values["backends"]
        )
        values["backends"] = backends
        # What code written for one upstream reads: the first backend.
        values["endpoint"] = backends[0].endpoint
        values["server_key"] = backends[0].api_key
    else:
        if "endpoint" not in values:
            if mode == "azure":
                raise ConfigError(
                    "--endpoint",
                    "required in azure mode (https://RESOURCE.openai.azure.com, or AZURE_OPENAI_ENDPOINT)",
                )
            values["endpoint"] = DEFAULT_OPENAI_ENDPOINT
        if values.get("auth") == "entra":
            if "server_key" in given:
                raise ConfigError(
                    given["auth"].label, "entra gets tokens from Entra ID: give no server key with it"
                )
            if mode != "azure":
                raise ConfigError(given["auth"].label, "entra is for azure mode")
        backends = ()  # Config derives the default backend from endpoint, server key and auth

    if (cert := "intercept_ca_cert" in values) != ("intercept_ca_key" in values):
        missing = "intercept.ca_key" if cert else "intercept.ca_cert"
        raise ConfigError(
            missing, "is missing: give ca_cert and ca_key together, or neither (a generated CA)"
        )
    if values.get("intercept") and mode != "azure":
        raise ConfigError(
            given["intercept"].label,
            "works in azure mode only (in openai mode api.openai.com is the upstream)",
        )

    values["client_keys"] = frozenset(values.get("client_names", ()))
    credential = values.get("server_key") or values.get("auth") == "entra" or backends
    if credential and not values.get("client_names") and not values.get("allow_anonymous"):
        source = next((given[n].label for n in ("server_key", "auth", "backends") if n in given), "--token")
        raise ConfigError(
            source,
            "a server credential without --client-keys would let anyone use it; give --client-keys, "
            "or --allow-anonymous if an open relay is intended",
        )

    if "forward_allow" not in given:
        endpoints = [b.endpoint for b in backends] or [values["endpoint"]]
        allow = ["api.openai.com:443"]
        for endpoint in endpoints:
            host = urlsplit(endpoint).hostname or ""
            if mode == "azure" or host != "api.openai.com":
                allow.append(f"{host}:443" if ":" not in host else f"[{host}]:443")
        values["forward_allow"] = tuple(dict.fromkeys(allow))


class LiveConfig:
    """
    The one mutable cell: the configuration in force.  A reload swaps it whole, so each
    request sees one consistent L{Config}; requests already running keep theirs.  What keeps
    state derived from it (the backend pool, Entra ID token sources) L{watch}es the swaps.
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self._watchers: list[Callable[[Config], None]] = []

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = config
        for watcher in list(self._watchers):
            watcher(config)

    def watch(self, watcher: Callable[[Config], None]) -> None:
        """Call C{watcher} with each new configuration once it is in force (after a reload)."""
        self._watchers.append(watcher)
