"""The package's public surface is what __all__ says, and nothing else."""

from __future__ import annotations

import subprocess
import sys

import ratekeeper


def test_every_exported_name_is_defined_and_all_is_sorted() -> None:
    """Each name in __all__ resolves to the object its module defines; __all__ is sorted."""
    assert ratekeeper.__all__ == sorted(ratekeeper.__all__, key=str.casefold)
    for name in ratekeeper.__all__:
        value = getattr(ratekeeper, name)
        assert value.__module__.startswith("ratekeeper.")
        assert value.__name__ == name


def test_an_unknown_name_is_an_attribute_error() -> None:
    """Asking the package for a name it does not export fails as a missing attribute does."""
    try:
        ratekeeper.not_a_name  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError:
        return
    raise AssertionError("ratekeeper.not_a_name did not raise AttributeError")


def test_importing_the_package_loads_nothing_else() -> None:
    """``import ratekeeper`` loads only its version and its face: the parts load when used."""
    code = ("import sys, ratekeeper; print(sorted(m for m in sys.modules "
            "if m.startswith('ratekeeper')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['ratekeeper', 'ratekeeper._version', 'ratekeeper.lazy']"
