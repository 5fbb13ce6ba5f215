"""The pure cooldown rules: retry headers, the default, the cap, only-lengthen."""

from __future__ import annotations

from email.utils import formatdate

import pytest
from twisted.web.http_headers import Headers

from aoaiproxy.backends.cooldown import (
    DEFAULT_COOLDOWN,
    Cooldowns,
    cooldown_for,
    retry_delay,
    seconds_until,
)

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("headers", "delay"),
    [
        ([(b"retry-after-ms", b"1500")], 1.5),
        ([(b"x-ms-retry-after-ms", b"250")], 0.25),
        ([(b"Retry-After", b"7")], 7.0),
        ([(b"retry-after", b" 2.5 ")], 2.5),
        ([(b"RETRY-AFTER-MS", b"1200.5")], 1.2005),
        # The millisecond headers are the precise ones and win, in this order.
        ([(b"retry-after", b"9"), (b"x-ms-retry-after-ms", b"300"), (b"retry-after-ms", b"100")], 0.1),
        ([(b"retry-after", b"9"), (b"x-ms-retry-after-ms", b"300")], 0.3),
        # A value that does not parse is as if absent.
        ([(b"retry-after-ms", b"soon"), (b"retry-after", b"3")], 3.0),
        ([(b"retry-after-ms", b"-5"), (b"x-ms-retry-after-ms", b"nan"), (b"retry-after", b"4")], 4.0),
        ([(b"retry-after", b"0")], 0.0),
        ([], None),
        ([(b"content-type", b"application/json")], None),
        ([(b"retry-after", b"inf")], None),
        ([(b"retry-after", b"1e3")], None),
        ([(b"retry-after", b"1_000")], None),
        ([(b"retry-after", b"-1")], None),
        ([(b"retry-after", b"tomorrow")], None),
        ([(b"retry-after", b"")], None),
        ([(b"retry-after", b"\xff\xfe")], None),
    ],
)
def test_retry_delay(headers: list[tuple[bytes, bytes]], delay: float | None) -> None:
    assert retry_delay(headers, NOW) == delay


def test_twisted_headers() -> None:
    headers = Headers({b"Retry-After": [b"9"], b"X-Ms-Retry-After-Ms": [b"4200"]})
    assert retry_delay(headers, NOW) == 4.2
    assert cooldown_for(Headers(), NOW, 60) == NOW + 10


def test_retry_after_http_date() -> None:
    ahead = formatdate(NOW + 30, usegmt=True).encode()
    assert retry_delay([(b"Retry-After", ahead)], NOW) == 30.0
    # The RFC 850 and asctime forms are HTTP dates too (GMT).
    assert retry_delay([(b"retry-after", b"Tuesday, 14-Nov-23 22:13:50 GMT")], NOW) == 30.0
    assert retry_delay([(b"retry-after", b"Tue Nov 14 22:13:50 2023")], NOW) == 30.0
    # A date that has passed means now.
    assert retry_delay([(b"retry-after", formatdate(NOW - 60, usegmt=True).encode())], NOW) == 0.0
    assert retry_delay([(b"retry-after", b"Tue, 14 Nov 99999 22:13:50 GMT")], NOW) is None


def test_cooldown_default_and_cap() -> None:
    assert cooldown_for([], NOW, 60) == NOW + DEFAULT_COOLDOWN == NOW + 10
    assert cooldown_for([(b"retry-after", b"abc")], NOW, 60) == NOW + 10
    assert cooldown_for([(b"retry-after-ms", b"2500")], NOW, 60) == NOW + 2.5
    assert cooldown_for([(b"retry-after", b"3600")], NOW, 60) == NOW + 60
    ahead = formatdate(NOW + 86400, usegmt=True).encode()
    assert cooldown_for([(b"retry-after", ahead)], NOW, 60) == NOW + 60
    # The default is capped too.
    assert cooldown_for([], NOW, 4) == NOW + 4


def test_cooldown_only_lengthens_and_expired_keys_go() -> None:
    c = Cooldowns()
    key = ("east", "gpt-4o")
    assert c.until(key) == 0.0
    assert c.cool(key, NOW + 20, NOW) == NOW + 20
    assert c.cool(key, NOW + 5, NOW + 1) == NOW + 20  # shorter: kept
    assert c.until(key) == NOW + 20
    assert c.cool(key, NOW + 30, NOW + 2) == NOW + 30  # longer: lengthened
    assert c.until(key) == NOW + 30
    other = ("west", "gpt-4o")
    c.cool(other, NOW + 1, NOW)
    c.cool(key, NOW + 31, NOW + 5)  # "other" has expired by now and is dropped
    assert c.until(other) == 0.0
    c.keep_only({"west"})
    assert c.until(key) == 0.0


def test_seconds_until_rounds_up_at_least_one() -> None:
    assert seconds_until(NOW + 1.5, NOW) == 2
    assert seconds_until(NOW + 2, NOW) == 2
    assert seconds_until(NOW + 0.01, NOW) == 1
    assert seconds_until(NOW, NOW) == 1
    assert seconds_until(NOW - 5, NOW) == 1
