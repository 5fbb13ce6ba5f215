"""``python -m aoaiproxy.testing``: see :mod:`aoaiproxy.testing.cli`."""

from .cli import main

main()
