"""`python -m jobqueue.client`: the command-line client (jobqueue.cli), as docs and scripts
have always run it. The library itself never imports the command line."""

import sys

from jobqueue import cli

sys.exit(cli.main())
