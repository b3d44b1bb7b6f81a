"""``python -m sf_sdk``: the ``sf-generate`` command (see :mod:`sf_sdk.cli`)."""

from sf_sdk.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
