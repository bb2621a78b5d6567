"""`python -m vitquant …` (and `torchrun --nproc_per_node N -m vitquant …`): the `vitquant` command."""
import sys

from vitquant.cli import main

sys.exit(main())
