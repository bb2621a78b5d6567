"""`python -m vitquant.export export|eval|cpu …` (see vitquant.export.cli)."""
import sys

from vitquant.export.cli import main

sys.exit(main())
