"""`python -m fusednn ...` is the `fusednn` command (what torchrun's `-m fusednn train ...` runs)."""
import sys

from fusednn.cli import main

sys.exit(main())
