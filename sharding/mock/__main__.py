"""Entry point of `python -m sharding.mock`."""

import sys

from sharding.mock.cli import main

sys.exit(main())
