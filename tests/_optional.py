"""Optional peers the tests adapt to (they are real dependencies of the ``test`` extra, but a
trimmed environment may lack them)."""

from __future__ import annotations


def has_autoattack() -> bool:
    """Whether upstream ``autoattack`` or PyPI's ``pyautoattack`` imports."""
    try:
        from attacks.autoattack import find_package

        find_package()
        return True
    except ImportError:
        return False
