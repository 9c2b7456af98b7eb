"""The TRL version gate: which TRL the integration supports, checked before anything imports TRL.

The package ``__init__`` calls ``check_trl_version()`` first, so a missing or unsupported TRL is
one ``EntropyLabError`` line instead of an ImportError from deep inside TRL or an override that
silently no longer matches TRL's private methods.

Deliberate simplification: the range is a half-open interval of release numbers; pre-releases
and local builds compare as ``packaging.version.Version`` orders them.
"""

from __future__ import annotations

from entropy_lab.errors import EntropyLabError

SUPPORTED_TRL = ("1.16", "1.17")
"""TRL versions the integration supports: at least the first, below the second (it overrides private methods)."""


def check_trl_version(version: str | None = None) -> str:
    """TRL's version, or one EntropyLabError when TRL is missing or outside ``SUPPORTED_TRL``.

    Args:
        version: the version to check; None imports TRL and checks its ``__version__``.

    Returns:
        The checked version string.
    """
    from packaging.version import Version

    if version is None:
        try:
            import trl
        except ImportError:
            raise EntropyLabError(
                'TRL is not installed: pip install "entropy-lab[trl]" (TRL >=1.16,<1.17)'
            ) from None
        version = trl.__version__
    low, high = SUPPORTED_TRL
    if not Version(low) <= Version(version) < Version(high):
        raise EntropyLabError(
            f'TRL {version} is outside the supported range >={low},<{high}: pip install "trl>={low},<{high}"'
        )
    return version
