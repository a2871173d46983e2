"""``python -m lrsearch``: same as the ``lrsearch`` console script."""

from lrsearch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
