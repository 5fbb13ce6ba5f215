"""
The option schema: every option through twistd's real command-line parser, C{--help}, and the
README's options table held to the declarations.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import attrs
import pytest
from docutils.core import publish_doctree
from twisted.python.usage import UsageError

from aoaiproxy.config import BACKEND_OPTIONS, OPTIONS, Config, backend_table, load_config, options_table
from aoaiproxy.options import file_keys, option, options_of, readme_rows
from aoaiproxy.tap import Options

from .conftest import REPO

AZ = "https://r.openai.azure.com"


def parse(*argv: str, environ: dict[str, str] | None = None) -> Options:
    """What C{twistd aoaiproxy ARGV} does with its arguments (with this environment)."""
    options = Options(environ or {})
    options.parseOptions(list(argv))
    return options


def write(path: Path, content: str) -> str:
    path.write_text(content)
    return str(path)


# Each flag: the arguments that give it (more may be needed, e.g. a key file), the Config field
# it sets and the value expected there.
def cases(tmp: Path) -> dict[str, tuple[list[str], str, Any]]:
    key_file = write(tmp / "server.key", " file-server-key \n")
    clients = write(tmp / "clients", "alice:alice-key\nplain-key\n")
    users = write(tmp / "users", "bob:pw\n")
    config = write(tmp / "c.toml", "max_headers = 7\n")
    open_relay = ["--allow-anonymous"]
    return {
        "listen": (
            ["--listen", "127.0.0.1:9000", "--listen", "unix:/x"],
            "listen",
            ("tcp:9000:interface=127.0.0.1", "unix:/x"),
        ),
        "mode": (["--mode", "openai"], "mode", "openai"),
        "endpoint": (["--endpoint", "https://x.openai.azure.com/"], "endpoint", "https://x.openai.azure.com"),
        "api-version": (["--api-version", "2025-01-01"], "api_version", "2025-01-01"),
        "model-mapper": (
            ["--model-mapper", "a=b", "--model-mapper", "c=d,a=e"],
            "models",
            {"a": "e", "c": "d"},
        ),
        "token": (["--token", "flag-server-key", *open_relay], "server_key", "flag-server-key"),
        "token-file": (["--token-file", key_file, *open_relay], "server_key", "file-server-key"),
        "auth": (["--auth", "entra", *open_relay], "auth", "entra"),
        "client-keys": (
            ["--client-keys", clients],
            "client_names",
            {"alice-key": "alice", "plain-key": "key2"},
        ),
        "allow-anonymous": (["--token", "k", "--allow-anonymous"], "allow_anonymous", True),
        "forward-allow": (
            ["--forward-allow", "a.example:443", "--forward-allow", "*.b.example:8443"],
            "forward_allow",
            ("a.example:443", "*.b.example:8443"),
        ),
        "forward-users": (["--forward-users", users], "forward_users", {"bob": "pw"}),
        "config": (["--config", config], "max_headers", 7),
        "max-body": (["--max-body", "1000"], "max_body", 1000),
        "log-format": (["--log-format", "json"], "log_format", "json"),
        "drain-timeout": (["--drain-timeout", "2.5"], "drain_timeout", 2.5),
        "keep-filter-frames": (["--keep-filter-frames"], "keep_filter_frames", True),
        "connect-timeout": (["--connect-timeout", "3"], "connect_timeout", 3.0),
        "upstream-timeout": (["--upstream-timeout", "4"], "upstream_timeout", 4.0),
        "max-request-line": (["--max-request-line", "100"], "max_request_line", 100),
        "max-header-size": (["--max-header-size", "1000"], "max_header_size", 1000),
        "max-headers": (["--max-headers", "9"], "max_headers", 9),
        "header-timeout": (["--header-timeout", "5"], "header_timeout", 5.0),
        "idle-timeout": (["--idle-timeout", "6"], "idle_timeout", 6.0),
        "tunnel-idle-timeout": (["--tunnel-idle-timeout", "7"], "tunnel_idle_timeout", 7.0),
        "max-connections": (["--max-connections", "8"], "max_connections", 8),
        "max-attempts": (["--max-attempts", "5"], "max_attempts", 5),
        "max-cooldown": (["--max-cooldown", "1.5"], "max_cooldown", 1.5),
        "intercept": (["--intercept"], "intercept", True),
        "state-dir": (["--state-dir", str(tmp / "state")], "state_dir", str(tmp / "state")),
        "metrics-listen": (
            ["--metrics-listen", "127.0.0.1:9100"],
            "metrics_listen",
            "tcp:9100:interface=127.0.0.1",
        ),
        "workers": (["--workers", "2"], "workers", 2),
    }


def every_flag() -> set[str]:
    return {flag for o in OPTIONS for flag in o.flags}


def test_the_cases_cover_every_flag(tmp_path: Path) -> None:
    assert set(cases(tmp_path)) == every_flag()


@pytest.mark.parametrize("flag", sorted(every_flag()))
def test_every_option_through_the_command_line(flag: str, tmp_path: Path) -> None:
    argv, field, expected = cases(tmp_path)[flag]
    endpoint = [] if flag in ("endpoint", "mode") else ["--endpoint", AZ]
    options = parse(*endpoint, *argv)
    assert options.config is not None
    value = getattr(options.config, field)
    if isinstance(expected, dict) and field == "models":
        value = {k: v for k, v in value.items() if k in expected}
    assert (dict(value) if isinstance(expected, dict) else value) == expected
    # SIGHUP re-reads with the same flags: they give the same configuration.
    assert load_config(options.flags(), {}) == options.config


def test_boolean_flags_work_on_the_command_line() -> None:
    # twistd stores a set flag as the integer 1: this once stopped start-up with
    # "--allow-anonymous: 1 is not true or false".
    options = parse(
        "--endpoint", AZ, "--token", "K", "--allow-anonymous", "--keep-filter-frames", "--intercept"
    )
    assert options.config is not None
    assert options.config.allow_anonymous and options.config.keep_filter_frames and options.config.intercept
    assert options.flags()["allow_anonymous"] is True


def test_flags_not_given_are_left_out_and_environment_is_read() -> None:
    environ = {"AZURE_OPENAI_ENDPOINT": AZ, "AZURE_OPENAI_AUTH": "entra", "AOAIPROXY_CONFIG": ""}
    options = parse("--allow-anonymous", environ=environ)
    assert options.flags() == {"allow_anonymous": True}
    assert options.config is not None
    assert options.config.endpoint == AZ and options.config.auth == "entra"
    # The command line wins over the environment.
    options = parse("--auth", "key", environ={"AZURE_OPENAI_ENDPOINT": AZ, "AZURE_OPENAI_AUTH": "entra"})
    assert options.config is not None and options.config.auth == "key"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--mode", "sideways"], "aoaiproxy: --mode: 'sideways' is not azure or openai"),
        (
            ["--endpoint", AZ, "--workers", "none"],
            "aoaiproxy: --workers: 'none' is not a whole number (or auto)",
        ),
        (["--endpoint", AZ, "--max-attempts", "0"], "aoaiproxy: --max-attempts: must be at least 1"),
        (["--mode", "openai", "--intercept"], "aoaiproxy: --intercept: works in azure mode only"),
    ],
)
def test_bad_options_stop_with_one_line(argv: list[str], line: str) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert str(e.value).startswith(line)
    assert "\n" not in str(e.value)


def test_a_flag_takes_no_value_and_a_parameter_needs_one() -> None:
    with pytest.raises(UsageError):
        parse("--endpoint", AZ, "--allow-anonymous=yes")
    with pytest.raises(UsageError):
        parse("--endpoint")


def test_help_shows_every_option_with_its_default_and_environment() -> None:
    text = " ".join(str(Options({})).split())
    for opt in OPTIONS:
        if not opt.flag:
            continue
        after = re.split(rf"--{opt.flag}[= ]", text, maxsplit=1)[1]
        after = re.split(r" --[a-z][a-z-]*[= ]", after, maxsplit=1)[0]
        assert "[default " in after, opt.flag
        for var in opt.env:
            assert var in after, (opt.flag, var)
    assert "--token-file" in text
    assert "``" not in text  # README markup is not shown


# -- the README -------------------------------------------------------------------------------


def readme_options_table() -> str:
    """The list-table of the README's Options section, as written."""
    readme = (REPO / "README.rst").read_text()
    section = readme.split("\nOptions\n-------\n", 1)[1]
    start = section.index(".. list-table::")
    lines = []
    for line in section[start:].splitlines():
        if line and not line.startswith(" ") and lines:
            break
        lines.append(line)
    return "\n".join(lines).rstrip() + "\n"


def table_rows(table: str) -> list[list[str]]:
    rows: list[list[str]] = []
    for line in table.splitlines():
        if m := re.match(r"   \* - ?(.*)$", line):
            rows.append([m.group(1)])
        elif m := re.match(r"     - ?(.*)$", line):
            rows[-1].append(m.group(1))
    return rows


def test_readme_options_table_is_the_schema() -> None:
    written = table_rows(readme_options_table())
    generated = table_rows(options_table())
    assert written[0] == ["Option", "Environment variable", "Config key", "Default", "Meaning"]
    assert len(generated) == len(OPTIONS) + 1 == len(readme_rows(OPTIONS)) + 1
    hint = 'regenerate with: python -c "from aoaiproxy.config import options_table; print(options_table())"'
    for row_written, row_generated in zip(written, generated, strict=False):
        assert row_written == row_generated, hint
    assert len(written) == len(generated), hint
    assert readme_options_table() == options_table()


def test_readme_backend_keys_table_is_the_schema() -> None:
    readme = (REPO / "README.rst").read_text()
    assert backend_table() in readme
    assert [row[0] for row in table_rows(backend_table())[1:]] == [
        " / ".join(f"``{k}``" for k in o.keys) for o in BACKEND_OPTIONS
    ]


def test_readme_and_its_options_table_are_valid_rst() -> None:
    for text in (options_table(), (REPO / "README.rst").read_text()):
        errors = io.StringIO()
        publish_doctree(
            text, settings_overrides={"warning_stream": errors, "report_level": 2, "halt_level": 5}
        )
        assert errors.getvalue() == ""
    rows = [n for n in publish_doctree(options_table()).findall() if n.tagname == "row"]
    assert len(rows) == len(OPTIONS) + 1


def test_every_config_field_but_the_derived_one_is_an_option() -> None:
    declared = {o.name for o in OPTIONS}
    assert {f.name for f in attrs.fields(Config)} - declared == {"client_keys"}
    keys = [k for o in OPTIONS for k in o.keys]
    assert len(keys) == len(set(keys))
    flags = [f for o in OPTIONS for f in o.flags]
    assert len(flags) == len(set(flags))


def test_example_config_names_only_known_keys() -> None:
    # The example's commented-out keys too: a typo there would stop a user's daemon.
    layout = file_keys(OPTIONS)
    backend_keys = file_keys(BACKEND_OPTIONS)
    table = ""
    seen = 0
    for line in (REPO / "systemd" / "aoaiproxy.toml.example").read_text().splitlines():
        line = line.lstrip("# ")
        if m := re.fullmatch(r"\[\[?([a-z_]+)\]\]?", line):
            table = m.group(1)
            assert table in layout, line
        elif m := re.match(r'([a-z_]+|"[^"]+") = ', line):
            seen += 1
            key = m.group(1)
            if table == "backend":
                assert key in backend_keys, line
            elif table and layout[table] is not None:
                assert key in (layout[table] or ()), line
            elif not table:
                assert key in layout, line
    assert seen > 30


def test_flag_key_and_default_text_are_made_from_the_field_unless_given() -> None:
    """A declaration says only what differs from its field's name and default."""

    @attrs.frozen
    class Declared:
        max_things: int = option(default=8, help="h", parse=str)
        warm: bool = option(default=True, kind="flag", help="h", parse=str, key="table.warm")
        ratio: float = option(default=0.5, help="h", parse=str, flag=None, key=None)
        colour: str = option(default="blue", help="h", parse=str, default_text="``blue`` (sky)")

    made = {o.name: (o.flag, o.key, o.default_text) for o in options_of(Declared)}
    assert made == {
        "max_things": ("max-things", "max_things", "8"),
        "warm": ("warm", "table.warm", "on"),
        "ratio": (None, None, "0.5"),
        "colour": ("colour", "colour", "``blue`` (sky)"),
    }
    with pytest.raises(TypeError, match="default_text must be given"):
        option(default=attrs.Factory(list), help="h", parse=str)
