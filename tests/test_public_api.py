"""The package's public surface is what __all__ says, and nothing else."""

from __future__ import annotations

import ratekeeper


def test_all_imports_are_exported() -> None:
    """Every public name in the package namespace is in __all__, sorted."""
    public = sorted(
        (name for name, value in vars(ratekeeper).items()
         if not name.startswith("_")
         and getattr(value, "__module__", "").startswith("ratekeeper.")),
        key=str.casefold,
    )
    assert sorted(ratekeeper.__all__, key=str.casefold) == public
