"""
Property tests (hypothesis): configuration parsing, the model map, CONNECT authority parsing
and upstream URL building never fail in an unexpected way, and never let a model name, a path
or an authority inject into the upstream request.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import string
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString

from aoaiproxy import forward, rewrite
from aoaiproxy.config import (
    DEFAULT_MODELS,
    Config,
    ConfigError,
    load_config,
    parse_forward_entry,
    parse_listen,
    parse_model_map,
    valid_deployment,
)
from aoaiproxy.errors import ProxyError
from aoaiproxy.forward import policy

from .rawnet import get_reactor

# Derandomized: the same examples on every run (and no flaky CI); raise max_examples to explore.
PROPERTIES = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

DEPLOYMENT_CHARS = string.ascii_letters + string.digits + "._-"
deployments = st.text(DEPLOYMENT_CHARS, min_size=1, max_size=64).filter(lambda d: d not in (".", ".."))
# Model names as clients send them: anything, weighted towards the characters that matter.
hostile = st.sampled_from([*list("/\\?#%.:@ \r\n\t\x00=,&[]"), "..", "%2e", "%2f", "\u2028", "é"])
models = st.one_of(
    st.text(max_size=80),
    st.lists(st.one_of(hostile, st.text(DEPLOYMENT_CHARS, max_size=4)), max_size=12).map("".join),
    st.sampled_from(sorted(DEFAULT_MODELS)),
)
ports = st.integers(0, 65535)
LABEL = r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
hostnames = st.from_regex(rf"{LABEL}(\.{LABEL}){{0,3}}", fullmatch=True)


def azure(**extra: Any) -> Config:
    return load_config({"endpoint": "https://res.openai.azure.com", **extra}, {})


# -- config parsing --------------------------------------------------------------------------


@PROPERTIES
@given(st.text(max_size=60))
def test_parse_listen_answers_or_refuses_cleanly(value: str) -> None:
    try:
        out = parse_listen(value)
    except ConfigError as e:
        assert e.option == "--listen"
        return
    assert out and out == out.strip()


@PROPERTIES
@given(st.one_of(hostnames, st.ip_addresses(v=4).map(str)), ports)
def test_parse_listen_go_form_is_a_tcp_endpoint_on_that_interface(host: str, port: int) -> None:
    description = parse_listen(f"{host}:{port}")
    endpoint = serverFromString(get_reactor(), description)
    assert isinstance(endpoint, TCP4ServerEndpoint)
    assert endpoint._port == port
    assert endpoint._interface == ("" if host == "0.0.0.0" else host)


@PROPERTIES
@given(st.ip_addresses(v=6), ports)
def test_parse_listen_go_form_ipv6(address: Any, port: int) -> None:
    description = parse_listen(f"[{address}]:{port}")
    endpoint = serverFromString(get_reactor(), description)
    assert isinstance(endpoint, TCP6ServerEndpoint if str(address) == "::" else TCP4ServerEndpoint)
    assert endpoint._port == port
    assert endpoint._interface in ("", "::", str(address))


@PROPERTIES
@given(st.integers(65536, 99999), st.one_of(st.just(""), hostnames))
def test_parse_listen_refuses_out_of_range_ports(port: int, host: str) -> None:
    with pytest.raises(ConfigError, match="out of range"):
        parse_listen(f"{host}:{port}")


@PROPERTIES
@given(st.text(max_size=120))
def test_parse_model_map_answers_or_refuses_cleanly(value: str) -> None:
    try:
        out = parse_model_map(value)
    except ConfigError as e:
        assert e.option == "--model-mapper"
        return
    for model, deployment in out.items():
        assert model and model == model.strip() and "," not in model and "=" not in model
        assert valid_deployment(deployment)


model_names = (
    st.text(string.ascii_letters + string.digits + ".-_:/ ", min_size=1, max_size=30)
    .map(str.strip)
    .filter(bool)
)


@PROPERTIES
@given(st.dictionaries(model_names, deployments, max_size=8))
def test_parse_model_map_round_trips(mapping: dict[str, str]) -> None:
    text = " , ".join(f"{m} = {d}" for m, d in mapping.items())
    assert parse_model_map(text) == mapping


@PROPERTIES
@given(st.text(max_size=60))
def test_parse_forward_entry_answers_or_refuses_cleanly(value: str) -> None:
    try:
        out = parse_forward_entry(value)
    except ConfigError as e:
        assert e.option == "--forward-allow"
        return
    host, _, port = out.rpartition(":")
    assert host and 0 < int(port) < 65536
    assert out == out.lower() and out == out.strip()
    assert "*" not in host or (host.startswith("*.") and "*" not in host[2:])
    assert parse_forward_entry(out) == out  # idempotent


ENV_VARS = [
    "AZURE_OPENAI_PROXY_ADDRESS",
    "AZURE_OPENAI_PROXY_MODE",
    "AZURE_OPENAI_ENDPOINT",
    "AZURE_OPENAI_APIVERSION",
    "AZURE_OPENAI_API_VER",
    "AZURE_OPENAI_MODEL_MAPPER",
    "AOAIPROXY_FORWARD_ALLOW",
    "UNRELATED",
]
SECRET = "sk-SECRET-0f1e2d3c4b5a"
env_values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["azure", "openai", "https://r.openai.azure.com", "127.0.0.1:8080", "a=b", "none"]),
)


@PROPERTIES
@given(st.dictionaries(st.sampled_from(ENV_VARS), env_values, max_size=6), st.booleans())
def test_load_config_with_any_environment_answers_or_refuses_cleanly(env: dict[str, str], key: bool) -> None:
    if key:
        env["AZURE_OPENAI_TOKEN"] = SECRET
    try:
        config = load_config({"allow_anonymous": True}, env)
    except ConfigError as e:
        assert "\n" not in str(e)
        assert SECRET not in str(e)  # never a key in a message
        return
    assert config.server_key == (SECRET if key else None)
    assert SECRET not in repr(config)
    assert config.mode in ("azure", "openai")
    assert urlsplit(config.endpoint).scheme in ("http", "https")
    assert all(valid_deployment(d) for d in config.models.values())
    assert config.listen and all(config.listen)
    if env.get("AZURE_OPENAI_PROXY_MODE") in ("azure", "openai"):
        assert config.mode == env["AZURE_OPENAI_PROXY_MODE"]


# -- the model map and URL building ----------------------------------------------------------


@PROPERTIES
@given(models, st.dictionaries(model_names, deployments, max_size=4))
def test_model_maps_to_a_valid_deployment_or_400(model: str, extra: dict[str, str]) -> None:
    config = azure(model_mapper=[",".join(f"{m}={d}" for m, d in extra.items())])
    try:
        deployment = rewrite.deployment_for(config, model)
    except ProxyError as e:
        assert e.status == 400 and e.code == "invalid_model"
        return
    assert valid_deployment(deployment)
    assert deployment == config.models.get(model, model)


FORBIDDEN_IN_PATH = ("\r", "\n", " ", "?", "#", "//", "\\", "%")


# A request-target's query: visible ASCII, no '#' (Twisted splits the request line on spaces).
queries = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#"), max_size=40)


@PROPERTIES
@given(models, st.sampled_from(sorted(rewrite.DEPLOYMENT_ROUTES)), queries.map(str.encode))
def test_no_model_name_injects_into_the_upstream_url(model: str, route: str, query: bytes) -> None:
    config = azure()
    body = json.dumps({"model": model}).encode()
    try:
        planned = rewrite.plan_upstream(
            config,
            rewrite.classify(config, "POST", "/v1/" + route),
            b"POST",
            query,
            [(b"api-key", b"k")],
            body,
        )
    except ProxyError as e:
        assert e.status == 400
        return
    url = planned.url.decode("ascii")
    base, _, _ = url.partition("?")
    deployment = planned.deployment
    assert deployment is not None and valid_deployment(deployment)
    assert (
        base
        == f"https://res.openai.azure.com/openai/deployments/{deployment}/{rewrite.DEPLOYMENT_ROUTES[route]}"
    )
    path = urlsplit(base).path
    assert not any(bad in path for bad in FORBIDDEN_IN_PATH)
    assert all(segment not in (".", "..") for segment in path.split("/"))
    assert url.count("api-version=") == 1


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=10,
)
raw_numbers = st.sampled_from([b"1e400", b"1E2", b"-0.0", b"1.000", b"123456789012345678901234567890"])


@PROPERTIES
@given(models, st.dictionaries(st.text(max_size=6), json_values, max_size=4), raw_numbers, st.booleans())
def test_v1_body_changes_only_in_its_model_value(
    model: str, rest: dict[str, Any], number: bytes, ascii: bool
) -> None:
    """Mapped or not, the upstream body is the client's with at most the model's bytes replaced."""
    config = azure(model_mapper=["gpt-4o=prod-4o"])
    rest.pop("model", None)
    tail = json.dumps(rest, ensure_ascii=ascii)[1:].encode("utf-8", "surrogatepass")
    before, after = b'{"n": ' + number + b', "model" : ', b" " + (b"," + tail if rest else b"}")
    body = before + json.dumps(model).encode() + after
    try:
        planned = rewrite.plan_upstream(
            config,
            rewrite.classify(config, "POST", "/v1/responses"),
            b"POST",
            b"",
            [(b"api-key", b"k")],
            body,
        )
    except ProxyError as e:
        assert e.status == 400 and e.code == "invalid_model"
        return
    deployment = config.models.get(model, model)
    if deployment == model:
        assert planned.body is None
    else:
        assert planned.body == before + json.dumps(deployment).encode() + after


@PROPERTIES
@given(
    st.sampled_from(["/v1/chat/completions", "/v1/responses", "/openai/deployments/d/chat/completions"]),
    st.one_of(
        st.binary(max_size=200),
        # Nested deeper than Python's recursion limit, and lone surrogates in a mapped body.
        st.integers(900, 3000).map(lambda d: b'{"model": "gpt-4o", "a": ' + b"[" * d + b"]" * d + b"}"),
        st.sampled_from([b'{"model": "gpt-3.5-turbo", "input": "\\ud83d"}', b'{"model": "\\udc00"}']),
    ),
)
def test_any_body_is_planned_or_refused_with_a_400(path: str, body: bytes) -> None:
    """Never an exception other than a 400 (an unexpected one would be a 500)."""
    config = azure()
    try:
        rewrite.plan_upstream(
            config, rewrite.classify(config, "POST", path), b"POST", b"", [(b"api-key", b"k")], body
        )
    except ProxyError as e:
        assert e.status == 400


# A request's path: no raw '?' or '#' (those end the path), anything else a client can send.
path_chars = st.sampled_from(
    [*"/ab.%2eEfF\\ \t\r\n\x00\x7f:@;", "..", "%2f", "%2e%2e", "%3f", "%23", "%00", "é"]
)
paths = st.lists(path_chars, max_size=30).map(lambda p: "/" + "".join(p))


@PROPERTIES
@given(st.sampled_from(["/v1/responses/", "/v1/files/", "/openai/", "/v1/"]), paths)
def test_no_path_escapes_its_route(prefix: str, rest: str) -> None:
    config = azure()
    path = prefix + rest.lstrip("/")
    try:
        route = rewrite.classify(config, "GET", path)
    except ProxyError as e:
        assert e.status in (400, 404, 405)
        return
    if route.kind not in ("v1api", "passthrough"):
        return
    url = rewrite.plain_url(config.endpoint, route.target, b"").decode("latin-1")
    assert url.startswith("https://res.openai.azure.com/openai/")
    target = urlsplit(url).path
    for bad in ("\r", "\n", " ", "\t", "\x00", "#", "?", "//", "\\"):
        assert bad not in target
    decoded = unquote(target)
    assert all(segment not in (".", "..") for segment in decoded.split("/"))


# -- CONNECT authorities ---------------------------------------------------------------------

authority_chars = st.sampled_from([*list("abcXYZ019.-:[]%@/ \\?#*\r\n\x00"), "::1", "127.0.0.1", "é"])


@PROPERTIES
@given(st.one_of(st.binary(max_size=40), st.lists(authority_chars, max_size=20).map("".join).map(str.encode)))
def test_parse_authority_answers_or_refuses_cleanly(target: bytes) -> None:
    try:
        host, port = forward.parse_authority(target)
    except ValueError:
        return
    assert 0 < port < 65536
    assert host and host == host.lower() and host.isascii()
    assert not any(c in host for c in "/\\@ ?#*%")
    again = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert forward.parse_authority(again.encode()) == (host, port)  # stable


@PROPERTIES
@given(st.one_of(hostnames, st.ip_addresses().map(str)), st.integers(1, 65535))
def test_parse_authority_reads_what_clients_send(host: str, port: int) -> None:
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    parsed_host, parsed_port = forward.parse_authority(target.upper().encode())
    assert parsed_port == port
    try:
        expected = ipaddress.ip_address(host).compressed
    except ValueError:
        expected = host
    assert parsed_host == expected


# -- a CONNECT's verdict, remembered ---------------------------------------------------------

connect_hosts = st.sampled_from(
    [
        "svc.example",
        "a.svc.example",
        "SVC.example.",
        "192.0.2.7",
        "[::1]",
        "[0::1]",
        "api.openai.com",
        "b.example",
    ]
)
connect_authorities = st.tuples(connect_hosts, st.sampled_from([443, 80, 8443])).map(
    lambda hp: f"{hp[0]}:{hp[1]}".encode()
)
malformed_targets = st.sampled_from(
    [b"bad host:443", b"[::1:443", b"svc.example:0", b"svc.example:70000", b"svc.example:", b"\xc3\xa9.x:443"]
)
connect_targets = st.one_of(connect_authorities, st.one_of(malformed_targets, st.binary(max_size=30)))
allow_entries = ["svc.example:443", "*.svc.example:443", "192.0.2.7:8443", "[::1]:443", "127.0.0.1:80"]
intercept_entries = ["api.openai.com:443", "svc.example:443", "[::1]:443", "b.example:80"]
proxy_authorizations = st.sampled_from(
    [None, b"Basic " + base64.b64encode(b"u:p"), b"Basic " + base64.b64encode(b"u:x"), b"Bearer x"]
)


def _verdict(admit: Any, config: Config, target: bytes, authorization: bytes | None) -> Any:
    try:
        return admit(config, b"CONNECT", target, authorization)
    except forward.Refused as e:
        return (e.error.status, e.error.message, e.error.code, e.error.headers)


@settings(PROPERTIES, max_examples=500)
@given(
    st.lists(connect_targets, min_size=1, max_size=6),
    st.lists(st.sampled_from(allow_entries), max_size=3, unique=True),
    st.booleans(),
    st.lists(st.sampled_from(intercept_entries), max_size=3, unique=True),
    st.booleans(),
    proxy_authorizations,
)
def test_a_remembered_connect_verdict_is_the_one_made_afresh(
    targets: list[bytes],
    allow: list[str],
    intercept: bool,
    intercept_hosts: list[str],
    users: bool,
    authorization: bytes | None,
) -> None:
    """C{admit} remembers a CONNECT's verdict; it is always the one C{admit_uncached} makes."""
    config = Config(
        forward_allow=tuple(allow),
        intercept=intercept,
        intercept_hosts=tuple(intercept_hosts),
        forward_users={"u": "p"} if users else {},
    )
    for target in targets * 2:  # each asked again: the second answer is remembered
        expected = _verdict(policy.admit_uncached, config, target, authorization)
        assert _verdict(forward.admit, config, target, authorization) == expected
