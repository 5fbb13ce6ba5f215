"""C{python -m aoaiproxy.testing} (or C{aoaiproxy-fake-azure}): fake Azure resources in the
foreground, as described in the package's docstring (also the epilog of C{--help})."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import Any

from .azure import FakeAzure
from .faults import Behaviour
from .identity import FakeManagedIdentity
from .records import RecordedRequest

# A fake run from the command line keeps this many requests for GET /_fake/requests.
MAX_RECORDED = 10_000


def _regions(text: str) -> list[tuple[str, int]]:
    """``east=8081,west=8082`` as [(name, port)]."""
    out = []
    for item in text.split(","):
        name, equals, port = item.strip().partition("=")
        if not equals or not name or not port.isdigit():
            raise argparse.ArgumentTypeError(f"regions are NAME=PORT[,NAME=PORT...], not {item!r}")
        out.append((name, int(port)))
    return out


def _reference() -> str:
    """The package docstring's command-line and control-endpoint reference."""
    from . import __doc__ as doc

    text = doc or ""
    return re.sub(r"[CL]\{([^}]*)\}", r"\1", text[text.find("Command line") :])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aoaiproxy.testing",
        description="Fake Azure OpenAI resources (one per region) and a fake managed-identity"
        " token endpoint, on loopback, for tests and for trying aoaiproxy.",
        epilog=_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--port",
        type=int,
        action="append",
        default=[],
        help="a fake on this TCP port (0: any free port); repeat for several (default: 8081)",
    )
    p.add_argument(
        "--regions",
        type=_regions,
        action="append",
        default=[],
        metavar="NAME=PORT[,...]",
        help="named fakes, one per region (e.g. east=8081,west=8082); may be repeated",
    )
    p.add_argument("--interface", default="127.0.0.1", help="address to listen on")
    p.add_argument("--api-key", default=None, help="require this api-key")
    p.add_argument("--stream-chunks", type=int, default=3, help="content chunks per stream")
    p.add_argument("--stream-interval", type=float, default=0.0, help="seconds between chunks")
    p.add_argument(
        "--behaviour",
        nargs="+",
        action="append",
        default=[],
        metavar="WORD",
        help="KIND [KEY=VALUE ...]: answer with a 429, 5xx, hang or close (see below); may be repeated",
    )
    p.add_argument(
        "--identity-port", type=int, default=None, help="also run a managed-identity token endpoint here"
    )
    p.add_argument("--identity-header", default=None, help="its IDENTITY_HEADER secret (default: random)")
    p.add_argument("--token-lifetime", type=float, default=3600.0, help="seconds a token lives")
    p.add_argument(
        "--require-token",
        action="store_true",
        help="the fakes require a bearer token from the token endpoint (or --api-key)",
    )
    p.add_argument("--quiet", action="store_true", help="do not print a line per request")
    return p


def main(argv: list[str] | None = None) -> None:
    """Run fakes in the foreground: ``python -m aoaiproxy.testing --port 8081``."""
    p = parser()
    args = p.parse_args(argv)
    regions = [region for group in args.regions for region in group]
    ports = args.port or ([] if regions else [8081])
    named = bool(regions) or len(ports) > 1
    instances = [(f"fake{i}" if len(ports) > 1 else "fake", port) for i, port in enumerate(ports, 1)]
    instances += regions
    names = [name for name, _ in instances]
    if len(set(names)) != len(names):
        p.error("region names must be unique")
    if args.require_token and args.identity_port is None:
        p.error("--require-token needs --identity-port")
    behaviours: list[tuple[Behaviour, str | None]] = []
    for words in args.behaviour:
        try:
            behaviour, region = Behaviour.from_words(words)
        except ValueError as e:
            p.error(f"--behaviour {' '.join(words)}: {e}")
        if region is not None and region not in names:
            p.error(f"--behaviour {' '.join(words)}: no region {region!r}")
        behaviours.append((behaviour, region))

    from twisted.internet import reactor

    def logger(prefix: str) -> Callable[[RecordedRequest], None] | None:
        def log_request(rec: RecordedRequest) -> None:
            print(f"{prefix}{rec.method} {rec.raw_uri} ({len(rec.body)} bytes)", flush=True)

        return None if args.quiet else log_request

    identity = None
    if args.identity_port is not None:
        identity = FakeManagedIdentity(
            reactor,
            lifetime=args.token_lifetime,
            identity_header=args.identity_header,
            on_request=logger("identity: "),
            max_recorded=MAX_RECORDED,
        )
        identity.listen(args.identity_port, args.interface)
    fakes: list[FakeAzure] = []
    for name, port in instances:
        fake = FakeAzure(
            reactor,
            name=name,
            region=name if named else "East US",
            api_key=args.api_key,
            identity=identity,
            require_token=args.require_token,
            on_request=logger(f"{name}: " if named else ""),
            max_recorded=MAX_RECORDED,
        )
        fake.stream_chunks = args.stream_chunks
        fake.stream_interval = args.stream_interval
        for behaviour, region in behaviours:
            if region in (None, name):
                fake.add_behaviour(behaviour)
        fake.listen(port, args.interface)
        fakes.append(fake)
    for fake in fakes:
        label = f" {fake.name}" if named else ""
        print(f"fake Azure OpenAI{label} listening on {fake.url}", flush=True)
    if identity is not None:
        print(f"fake managed identity listening on {identity.endpoint}", flush=True)
        print(" ".join(f"{k}={v}" for k, v in identity.environ().items()), flush=True)
    _run(reactor)


def _run(reactor: Any) -> None:
    reactor.run()
    sys.stdout.flush()
