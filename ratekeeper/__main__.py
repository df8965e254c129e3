"""``python -m ratekeeper``."""

from __future__ import annotations

from ratekeeper.process.cli import main

raise SystemExit(main())
