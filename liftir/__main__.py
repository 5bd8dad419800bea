"""`python -m liftir` runs the `liftir` command."""
import sys

from .cli import main

sys.exit(main())
