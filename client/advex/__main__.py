"""`python -m advex`: the same as the `advex` command."""
import sys

from advex.client.cli import main

sys.exit(main())
