"""Train the testbed model: same as ``python -m sparsevid.lab.testbed.train`` (see its --help)."""

import sys

from sparsevid.lab.testbed.train import main

if __name__ == "__main__":
    sys.exit(main())
