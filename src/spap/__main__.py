"""`python -m spap` (and `torchrun ... -m spap prune ...`): the command line."""

import sys

from .cli import main

sys.exit(main())
