"""
The one way aoaiproxy compares a secret a client presents (an API key, proxy credentials)
with the ones it knows.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

__all__ = ["equal_to_any"]


def equal_to_any(presented: bytes, known: Iterable[bytes]) -> bool:
    """
    Whether C{presented} equals one of C{known}.  Each comparison takes constant time and
    every one of C{known} is compared, whatever the outcome, so the time taken tells nothing
    about which (or whether one) matched.
    """
    found = False
    for candidate in known:
        found |= hmac.compare_digest(presented, candidate)
    return found
