"""
The bench's own arithmetic (bench/_harness.py): what it reads from wrk and py-spy, the payloads
it sends and the table it prints.  No process is started and nothing is timed here.
"""

from __future__ import annotations

import importlib
import json
from types import ModuleType

import pytest

from .conftest import REPO


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    return importlib.import_module("_harness")


WRK_OUTPUT = """\
Running 3s test @ http://127.0.0.1:40000/v1/chat/completions
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    30.25ms   10.01ms 120.00ms   80.00%
  6000 requests in 3.00s, 4.50MB read
  Non-2xx or 3xx responses: 7
Requests/sec:   2000.00
WRKJSON {"requests": 6000, "duration_us": 3000000, "connect": 0, "read": 1, "write": 0, \
"status": 7, "timeout": 2, "p50_us": 1250.0, "p99_us": 9000.5, "max_us": 120000.0}
"""


def test_parse_wrk_reads_the_summary_line(harness: ModuleType) -> None:
    summary = harness.parse_wrk(WRK_OUTPUT)
    assert summary["rps"] == 2000.0
    assert summary["errors"] == 10  # read 1 + status 7 + timeout 2
    assert summary["p50_us"] == 1250.0
    assert summary["p99_us"] == 9000.5


def test_parse_wrk_without_the_summary_says_so(harness: ModuleType) -> None:
    with pytest.raises(ValueError, match="no WRKJSON line"):
        harness.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_payloads_are_the_advertised_chat_completions(harness: ModuleType) -> None:
    for body, stream in ((harness.CHAT_REQUEST, False), (harness.STREAM_REQUEST, True)):
        assert len(body) == 575
        assert json.loads(body)["stream"] is stream
    assert b'"stream":true' in harness.STREAM_REQUEST  # what loadtool's upstream looks for
    assert len(harness.CHAT_RESPONSE) == 575
    assert json.loads(harness.CHAT_RESPONSE)["object"] == "chat.completion"
    assert harness.STREAM_CHUNK.startswith(b"data: {") and harness.STREAM_CHUNK.endswith(b"}\n\n")


def test_profile_tables_sum_self_and_inclusive_time(harness: ModuleType) -> None:
    lines = [
        "process 1:python;run (/v/lib/python3.11/site-packages/twisted/internet/base.py:9);"
        "render (/w/aoaiproxy/resource.py:5);encode (/v/lib/python3.11/site-packages/idna/core.py:3) 3",
        "process 1:python;run (/v/lib/python3.11/site-packages/twisted/internet/base.py:9);"
        "render (/w/aoaiproxy/resource.py:7) 1",
        # recursion: the function counts once for its inclusive share
        "process 1:python;run (/v/lib/python3.11/site-packages/twisted/internet/base.py:9);"
        "run (/v/lib/python3.11/site-packages/twisted/internet/base.py:12) 4",
        "garbage",
    ]
    total, functions, modules = harness.profile_tables(harness.parse_collapsed(lines))
    assert total == 8
    assert functions[0] == ("twisted.internet.base:run", 50.0, 100.0)
    assert ("idna.core:encode", 37.5, 37.5) in functions
    # Two line numbers of one function merge: 1 sample self, 4 inclusive.
    assert ("aoaiproxy.resource:render", 12.5, 50.0) in functions
    assert [m[0] for m in modules] == ["twisted.internet.base", "idna.core", "aoaiproxy.resource"]


def test_frame_module_names_standard_library_and_checkout(harness: ModuleType) -> None:
    assert harness.frame_module(
        "urlsplit (/root/.pyenv/versions/3.11.7/lib/python3.11/urllib/parse.py:4)"
    ) == ("urllib.parse")
    assert harness.frame_module("f (/work/wt/x/aoaiproxy/relay.py:1)") == "aoaiproxy.relay"
    assert (
        harness.frame_module("f (twisted/web/_newclient.py:7)") == "twisted.web._newclient"
    )  # as py-spy shows it


def test_table_shows_medians_and_ratios(harness: ModuleType) -> None:
    rps = harness.Figure("plain", "req/s")
    for target, values in (("aoaiproxy", [100, 300, 200]), ("nginx", [1000, 1000]), ("floor", [400])):
        for v in values:
            rps.add(target, v)
    alone = harness.Figure("held", "open", samples={"aoaiproxy": [5.0]})
    added = harness.Figure("chunks", "added ms", samples={"aoaiproxy": [3.0], "nginx": [-1.0]})
    lines = harness.table([rps, alone, added]).splitlines()
    assert lines[2] == "| plain | req/s | 200 | nginx | 1,000 | 0.20 |"
    assert lines[3] == "|  |  |  | floor | 400 | 0.50 |"
    assert lines[4] == "| held | open | 5 | — | — | — |"
    assert lines[5] == "| chunks | added ms | 3 | nginx | -1 | — |"


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    return importlib.import_module("counts")


CALLGRIND_DUMP = """\
# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 4242
cmd:  /work/venv/bin/python /work/venv/bin/twistd --nodaemon aoaiproxy
part: 1
events: Ir
fl=(1) ???
fn=(1) 0x0000000000021090
0 3
summary: 807123456
totals: 807123456
"""

STRACE_TABLE = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 15.69    0.131228          10     12000           epoll_ctl
  9.84    0.082292          13      6000      4000 shutdown
  9.55    0.079866          39      2000      2000 connect
  1.53    0.012807          12      1012           epoll_wait
------ ----------- ----------- --------- --------- ----------------
100.00    0.836513          14     21012      6000 total
"""


def test_counts_reads_callgrind_totals(counts: ModuleType) -> None:
    assert counts.parse_callgrind_totals(CALLGRIND_DUMP) == 807123456
    with pytest.raises(ValueError):
        counts.parse_callgrind_totals("events: Ir\n")


def test_counts_reads_strace_calls_with_and_without_errors(counts: ModuleType) -> None:
    assert counts.parse_strace_counts(STRACE_TABLE) == {
        "epoll_ctl": 12000,
        "shutdown": 6000,
        "connect": 2000,
        "epoll_wait": 1012,
        "total": 21012,
    }


def test_counts_report_shows_medians_per_operation(counts: ModuleType) -> None:
    samples = {
        ("request", "callgrind", "."): [{"instructions": 800_000.0}, {"instructions": 820_000.0}],
        ("request", "strace", "."): [{"total": 5.2, "sendto": 2.0, "recvfrom": 2.0, "write": 1.0}],
        ("connect", "callgrind", "floor"): [{"instructions": 648_100.0}],
    }
    lines = counts.report(samples, 1000).splitlines()
    assert lines[4] == "| request | . | 810.0k | 5.2 | recvfrom 2, sendto 2, write 1 |"
    assert lines[5] == "| connect | floor | 648.1k | - | - |"


def test_counts_request_is_the_benchs_chat_completion(counts: ModuleType, harness: ModuleType) -> None:
    request = counts.request_bytes()
    head, body = request.split(b"\r\n\r\n", 1)
    assert body == harness.CHAT_REQUEST
    assert b"Content-Length: %d" % len(body) in head.split(b"\r\n")
