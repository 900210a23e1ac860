"""``python -m lagnet``: the ``lagnet`` command."""

from __future__ import annotations

from lagnet.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
