#!/usr/bin/env python
"""sidrec command line: `python run.py --help`."""
import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main())
