"""
The option schema: how one option is declared, and what is generated from the declarations.

Every option is declared once, as a field of L{aoaiproxy.config.Config} made by L{option}: its
command-line flag, environment variables, config-file key, parser, default, help text and
whether C{SIGHUP} may change it.  From those declarations come twistd's option tables
(L{flag_table}, L{parameter_table}, L{repeatable_handlers}), the reading of flags, environment
and TOML file in precedence order (L{Sources}), the check for unknown config keys
(L{check_file_keys}), the C{--help} text and the README's options table (L{readme_table}).

A parser takes the raw value and a label (the name the user knows it by: the flag, the
environment variable or the config key) and returns the value or raises L{ConfigError}.  No
parser ever echoes the value of a secret option, and no type error echoes any value.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal

import attrs

__all__ = [
    "FROM_NAME",
    "ConfigError",
    "Given",
    "Option",
    "Sources",
    "boolean",
    "check_file_keys",
    "choice",
    "file_keys",
    "flag_table",
    "given_flags",
    "help_text",
    "key_table",
    "number",
    "option",
    "options_of",
    "parameter_table",
    "readme_rows",
    "readme_table",
    "repeatable_handlers",
    "string_list",
    "text",
    "type_name",
]

#: A parser: the raw value (a string from a flag or the environment, a TOML value from the
#: file) and the label to name in errors, to the option's value.
Parser = Callable[[Any, str], Any]

#: How an option takes its values.  C{value}: one value.  C{flag}: a boolean that a bare
#: C{--flag} turns on.  C{list}: a repeatable flag, a comma-separated environment variable, a
#: TOML array; the parser gets a list of strings.  C{table}: a mapping merged entry by entry
#: across defaults, file, environment and flags (the parser gets one string or one TOML
#: table).  C{tables}: an array of TOML tables (C{[[backend]]}), from the file only.
Kind = Literal["value", "flag", "list", "table", "tables"]

_METADATA_KEY = "aoaiproxy.option"


class _FromName(enum.Enum):
    """The type of L{FROM_NAME}."""

    FROM_NAME = "from the field's name"


#: For L{option}'s C{flag} and C{key}: made from the field's name (C{max_body}: the flag
#: C{max-body}, the key C{max_body}), the default of both.
FROM_NAME: Final = _FromName.FROM_NAME


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
class Option:
    """
    One option's declaration.

    @ivar name: the L{Config} field it fills (set by L{options_of}).
    @ivar flag: the long command-line flag without its dashes (C{max-body}); None for an
        option of the config file only.  Its key in the flags given to C{load_config} is the
        flag with underscores (C{max_body}).
    @ivar env: environment variables, the first set (and not empty) wins.
    @ivar key: the config-file key, dotted for a key in a table (C{forward.allow}).
    @ivar file_flag: the flag of a variant that names a file holding the value
        (C{--token-file}); it comes after the plain flag.
    @ivar file_key: the config key of that variant (C{api_key_file}); it comes after the
        plain key.
    @ivar read_file: reads the value from that file (given the path and the label).
    @ivar reload: whether C{SIGHUP} may change it (else a change waits for a restart).
    @ivar secret: its values are keys: never in C{repr}, never in a message.
    @ivar default_text: the default as the README and C{--help} show it (RST literals).
    @ivar note: shown after the flag in the README and C{--help}.
    @ivar env_default: computes the default from the environment when no source gives one.
    """

    help: str
    parse: Parser
    default_text: str
    kind: Kind = "value"
    name: str = ""
    flag: str | None = None
    short: str | None = None
    metavar: str | None = None
    env: tuple[str, ...] = ()
    key: str | None = None
    file_flag: str | None = None
    file_key: str | None = None
    read_file: Parser | None = None
    reload: bool = True
    secret: bool = False
    note: str = ""
    env_default: Callable[[Mapping[str, str]], Any] | None = None

    @property
    def flag_key(self) -> str | None:
        """The option's key in the flags mapping (the flag with underscores)."""
        return self.flag.replace("-", "_") if self.flag else None

    @property
    def flags(self) -> tuple[str, ...]:
        """Its command-line flags: the flag and the file variant's."""
        return tuple(f for f in (self.flag, self.file_flag) if f)

    @property
    def keys(self) -> tuple[str, ...]:
        """Its config keys: the key and the file variant's."""
        return tuple(k for k in (self.key, self.file_key) if k)

    @property
    def label(self) -> str:
        """The name errors use for it when it comes from a flag: C{--max-body}, else its key."""
        return f"--{self.flag}" if self.flag else (self.key or self.name)


def option(
    *,
    default: Any,
    help: str,
    parse: Parser,
    default_text: str | None = None,
    kind: Kind = "value",
    flag: str | _FromName | None = FROM_NAME,
    short: str | None = None,
    metavar: str | None = None,
    env: tuple[str, ...] = (),
    key: str | _FromName | None = FROM_NAME,
    file_flag: str | None = None,
    file_key: str | None = None,
    read_file: Parser | None = None,
    reload: bool = True,
    secret: bool = False,
    note: str = "",
    env_default: Callable[[Mapping[str, str]], Any] | None = None,
) -> Any:
    """
    Declare a L{Config} field as an option (see L{Option} for the arguments).  C{default} is
    the field's attrs default (a value or an C{attrs.Factory}).  C{flag} and C{key} are made
    from the field's name unless given (C{None}: the option has none); C{default_text} is
    made from a plain C{default} (L{_default_text}) unless given.
    """
    declaration = Option(
        help=" ".join(help.split()),
        parse=parse,
        default_text=_default_text(default) if default_text is None else default_text,
        kind=kind,
        flag=None if flag is FROM_NAME else flag,
        short=short,
        metavar=metavar,
        env=env,
        key=None if key is FROM_NAME else key,
        file_flag=file_flag,
        file_key=file_key,
        read_file=read_file,
        reload=reload,
        secret=secret,
        note=note,
        env_default=env_default,
    )
    named = (flag is FROM_NAME, key is FROM_NAME)
    return attrs.field(
        default=default,
        repr=not secret,
        metadata={_METADATA_KEY: declaration, _NAMED_KEY: named},
    )


_NAMED_KEY = "aoaiproxy.option.named"


def _default_text(default: Any) -> str:
    """
    How a plain default is shown: C{off}/C{on}, a number as written (C{30}, C{0.5}), a
    string as an RST literal.  Any other default needs its C{default_text} given.
    """
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, int):
        return str(default)
    if isinstance(default, float):
        return f"{default:g}"
    if isinstance(default, str) and default:
        return f"``{default}``"
    raise TypeError(f"default_text must be given for a default of {default!r}")


def options_of(cls: type) -> tuple[Option, ...]:
    """The options declared as fields of the attrs class C{cls}, in field order."""
    declared = []
    for f in attrs.fields(cls):
        if _METADATA_KEY not in f.metadata:
            continue
        flag_named, key_named = f.metadata[_NAMED_KEY]
        declaration: Option = f.metadata[_METADATA_KEY]
        declared.append(
            attrs.evolve(
                declaration,
                name=f.name,
                flag=f.name.replace("_", "-") if flag_named else declaration.flag,
                key=f.name if key_named else declaration.key,
            )
        )
    return tuple(declared)


# -- parsers ----------------------------------------------------------------------------------


def type_name(value: Any) -> str:
    """What kind of (TOML) value C{value} is, for an error message that must not show it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (datetime.date, datetime.time)):
        return "a date or time"
    return type(value).__name__


def text(value: Any, label: str) -> str:
    """A string (stripped of surrounding whitespace)."""
    if not isinstance(value, str):
        raise ConfigError(label, f"must be a string, not {type_name(value)}")
    return value.strip()


def choice(*choices: str) -> Parser:
    """One of C{choices}."""

    def parse(value: Any, label: str) -> str:
        word = text(value, label)
        if word not in choices:
            raise ConfigError(label, f"{word!r} is not {' or '.join(choices)}")
        return word

    return parse


def boolean(value: Any, label: str) -> bool:
    """C{true}/C{false} in TOML, a set flag, or C{1/true/yes/on} and C{0/false/no/off}."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    if isinstance(value, str):
        raise ConfigError(label, f"{value!r} is not true or false")
    raise ConfigError(label, f"must be true or false, not {type_name(value)}")


def number(
    *, integer: bool = False, least: int | None = None, unit: str = "", above_zero: bool = False
) -> Parser:
    """
    A number that is not negative (a whole one if C{integer}), at least C{least} (in C{unit}s),
    or more than 0 seconds if C{above_zero}.
    """

    def parse(value: Any, label: str) -> float:
        if isinstance(value, str):
            try:
                n: float = int(value.strip()) if integer else float(value)
            except ValueError:
                raise ConfigError(label, f"{value!r} is not a {'whole ' if integer else ''}number") from None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if integer and value != int(value):
                raise ConfigError(label, f"{value!r} is not a whole number")
            n = int(value) if integer else float(value)
        else:
            raise ConfigError(label, f"must be a number, not {type_name(value)}")
        if n < 0 or n != n or n == float("inf"):
            raise ConfigError(label, f"{value!r} must be a positive number")
        if least is not None and n < least:
            raise ConfigError(label, f"must be at least {least}{' ' + unit if unit else ''}")
        if above_zero and n <= 0:
            raise ConfigError(label, "must be more than 0 seconds")
        return n

    return parse


def string_list(value: Any, label: str) -> list[str]:
    """A comma-separated string, a list of strings (empty items dropped)."""
    if isinstance(value, str):
        return [v for v in (s.strip() for s in value.split(",")) if v]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ConfigError(label, "must be a list of strings")


# -- reading the sources ----------------------------------------------------------------------


@attrs.frozen
class Given:
    """An option's value and the label of the source that gave it."""

    value: Any
    label: str


@attrs.frozen
class Sources:
    """
    The command-line flags (by flag key), the environment and the config file's document (or
    one table of it, whose keys errors name after C{prefix}: C{backend[east].}); L{get} gives
    an option's value from the first source that sets it.
    """

    flags: Mapping[str, Any]
    env: Mapping[str, str]
    file: Mapping[str, Any]
    prefix: str = ""

    def flag(self, key: str | None) -> Any:
        """A flag's value, or None if it was not given (an empty list and False are not)."""
        if key is None:
            return None
        value = self.flags.get(key)
        return None if value in (None, [], (), False) else value

    def environ(self, names: Iterable[str]) -> tuple[str, str] | None:
        """The first of C{names} set to something: (name, value)."""
        for name in names:
            if self.env.get(name, "") != "":
                return name, self.env[name]
        return None

    def lookup(self, key: str | None) -> Any:
        """A dotted config key's value in the file, or None."""
        if key is None:
            return None
        node: Any = self.file
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return node

    def file_label(self, opt: Option, key: str) -> str:
        """
        How an error names a value from the file: as the flag where the key has the flag's
        name (C{endpoint} is C{--endpoint}), else as the key (C{api_key}, C{forward.allow}).
        """
        if opt.flag_key == key:
            return f"--{opt.flag}"
        return self.prefix + key

    def raw(self, opt: Option) -> list[tuple[Any, str, bool]]:
        """Every value given for C{opt}, (value, label, from a file variant), highest first."""
        out: list[tuple[Any, str, bool]] = []
        if (value := self.flag(opt.flag_key)) is not None:
            out.append((value, opt.label, False))
        if opt.file_flag and (value := self.flag(opt.file_flag.replace("-", "_"))) is not None:
            out.append((value, f"--{opt.file_flag}", True))
        if (found := self.environ(opt.env)) is not None:
            out.append((found[1], found[0], False))
        if opt.key and (value := self.lookup(opt.key)) is not None:
            out.append((value, self.file_label(opt, opt.key), False))
        if opt.file_key and (value := self.lookup(opt.file_key)) is not None:
            out.append((value, self.prefix + opt.file_key, True))
        return out

    def get(self, opt: Option) -> Given | None:
        """C{opt}'s parsed value from the highest source that gives it, or None."""
        given = self.raw(opt)
        if opt.kind == "table":
            return self._merged(opt, given) if given else None
        if not given:
            return None
        value, label, is_file = given[0]
        if is_file:
            assert opt.read_file is not None
            value = opt.read_file(text(value, label), label)
        if opt.kind == "list":
            value = string_list(value, label)
        elif opt.kind == "flag" and value == 1 and not isinstance(value, bool):
            value = True  # twistd stores a set flag as the integer 1
        return Given(opt.parse(value, label), label)

    def _merged(self, opt: Option, given: list[tuple[Any, str, bool]]) -> Given:
        """A table option: lowest source first, each entry overriding the same entry below."""
        merged: dict[str, Any] = {}
        for value, label, _ in reversed(given):
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                merged.update(opt.parse(item, label))
        return Given(merged, given[0][1])


# -- the config file's keys -------------------------------------------------------------------


def file_keys(options: Iterable[Option]) -> dict[str, set[str] | None]:
    """
    The config file's layout: top-level keys, each mapped to the keys its table may hold, or
    to None for a plain value or a table whose keys are free (C{[models]}, C{[[backend]]}).
    """
    layout: dict[str, set[str] | None] = {}
    for opt in options:
        for key in opt.keys:
            top, _, sub = key.partition(".")
            if sub:
                keys = layout.setdefault(top, set())
                assert keys is not None, key
                keys.add(sub)
            else:
                layout[top] = None
    return layout


def check_file_keys(document: Mapping[str, Any], options: Iterable[Option], where: str) -> None:
    """Refuse, in one line, a key no option declares (top-level and in each table)."""
    layout = file_keys(options)
    for key in document:
        if key not in layout:
            raise ConfigError("--config", f"{where}: unknown key {key!r}")
    for table, keys in layout.items():
        if keys is None or table not in document:
            continue
        if not isinstance(document[table], dict):
            raise ConfigError("--config", f"{where}: [{table}] must be a table")
        for key in document[table]:
            if key not in keys:
                raise ConfigError("--config", f"{where}: unknown key '{table}.{key}'")


# -- twistd's option tables -------------------------------------------------------------------


def _plain(rst: str) -> str:
    return rst.replace("``", "")


def help_text(opt: Option) -> str:
    """The C{--help} text: the help, then C{[default ...; env ...; config key ...]}."""
    facts = [f"default {_plain(opt.default_text)}"]
    if opt.env:
        facts.append("env " + " or ".join(opt.env))
    if opt.keys:
        facts.append("config key " + " or ".join(opt.keys))
    if not opt.reload:
        facts.append("a restart changes it, SIGHUP does not")
    note = f" ({_plain(opt.note)})" if opt.note else ""
    return f"{_plain(opt.help)}{note} [{'; '.join(facts)}]"


def flag_table(options: Iterable[Option]) -> list[list[str | None]]:
    """twistd's C{optFlags}: the boolean options."""
    return [[o.flag, o.short, help_text(o)] for o in options if o.flag and o.kind == "flag"]


def parameter_table(options: Iterable[Option]) -> list[list[str | None]]:
    """
    twistd's C{optParameters}: options taking one value (and file variants).  Their twistd
    default is None, so that a value not given is told apart from one given.
    """
    table: list[list[str | None]] = []
    for o in options:
        if o.flag and o.kind == "value":
            table.append([o.flag, o.short, None, help_text(o)])
        if o.flag and o.file_flag:
            table.append([o.file_flag, None, None, f"File holding the value of --{o.flag}"])
    return table


def repeatable_handlers(options: Iterable[Option]) -> dict[str, Callable[[Any, str], None]]:
    """
    twistd C{opt_*} methods for the repeatable options (lists and tables): each use appends
    to a list under the option's flag key.
    """
    handlers: dict[str, Callable[[Any, str], None]] = {}
    for o in options:
        if not o.flag or o.kind not in ("list", "table"):
            continue

        handler = _appender(o.flag.replace("-", "_"), help_text(o))
        handlers["opt_" + o.flag.replace("-", "_")] = handler
        if o.short:
            handlers["opt_" + o.short] = handler
    return handlers


def _appender(key: str, doc: str) -> Callable[[Any, str], None]:
    def handler(self: Any, value: str) -> None:
        self.setdefault(key, []).append(value)

    handler.__doc__ = doc
    return handler


def given_flags(options: Iterable[Option], parsed: Mapping[str, Any]) -> dict[str, Any]:
    """
    The options given on a command line that twistd parsed (C{parsed}, keyed by flag), keyed
    by flag key: a set flag is True, an option not given is left out.
    """
    out: dict[str, Any] = {}
    for o in options:
        for name in o.flags:
            value = parsed.get(name, parsed.get(name.replace("-", "_")))
            if value in (None, [], 0):
                continue
            out[name.replace("-", "_")] = True if o.kind == "flag" else value
    return out


# -- the README's options table ---------------------------------------------------------------


def _literal(words: Iterable[str]) -> str:
    return " / ".join(f"``{w}``" for w in words)


def readme_rows(options: Iterable[Option]) -> list[tuple[str, str, str, str, str]]:
    """The README table's rows: option, environment variable, config key, default, meaning."""
    rows = []
    for o in options:
        notes = []
        if o.kind in ("list", "table") and o.flag:
            notes.append("repeatable")
        if o.note:
            notes.append(o.note)
        flags = [f"--{o.flag}" + (f" {o.metavar}" if o.metavar else "")] if o.flag else []
        if o.file_flag:
            flags.append(f"--{o.file_flag} PATH")
        cell = _literal(flags) + (f" ({'; '.join(notes)})" if notes else "")

        env = f"``{o.env[0]}``" if o.env else ""
        if len(o.env) > 1:
            env += f" (or {_literal(o.env[1:])})"
        elif o.env and o.kind == "list":
            env += " (comma-separated)"

        keys = o.keys
        if o.kind == "table":
            key = f"``[{o.key}]`` table"
        elif o.kind == "tables":
            key = f"``[[{o.key}]]`` tables"
        elif keys and "." in keys[0]:
            table, _, sub = keys[0].partition(".")
            key = f"``[{table}] {sub}``" + (" (list)" if o.kind == "list" else "")
        else:
            key = _literal(keys) + (" (list)" if o.kind == "list" and keys else "")
        meaning = o.help + ("; a restart changes it, SIGHUP does not" if not o.reload else "")
        rows.append((cell.strip(), env, key, o.default_text, meaning))
    return rows


def readme_table(options: Iterable[Option]) -> str:
    """The README's options table as reStructuredText (a C{list-table})."""
    header = ("Option", "Environment variable", "Config key", "Default", "Meaning")
    return _list_table([header, *readme_rows(options)])


def key_table(options: Iterable[Option]) -> str:
    """The keys of a table of the config file (C{[[backend]]}) as a C{list-table}."""
    rows = [(_literal(o.keys), o.default_text, o.help) for o in options]
    return _list_table([("Key", "Default", "Meaning"), *rows])


def _list_table(rows: Iterable[tuple[str, ...]]) -> str:
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in rows:
        first, *rest = row
        lines.append(f"   * - {first}".rstrip())
        lines.extend(f"     - {cell}".rstrip() for cell in rest)
    return "\n".join(lines) + "\n"
