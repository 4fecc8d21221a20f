"""`python -m jaxmem`: the same as the `jaxmem` command."""

import sys

from jaxmem.cli import main

sys.exit(main())
