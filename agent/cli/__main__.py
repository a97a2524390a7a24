"""python -m scanside.agent.cli: the scanside command."""
import sys

from scanside.agent.cli import main

sys.exit(main())
