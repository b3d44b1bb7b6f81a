import sys

from sf_sdk.serve.cli import main

sys.exit(main())
