"""Registry of imaged sites; a site's module is imported only when it is asked for."""

from __future__ import annotations

import importlib

from cohort.sites.base import CaseInputs, Site

__all__ = ["SITE_NAMES", "CaseInputs", "Site", "get_site"]

_REGISTRY = {
    "hand": ("cohort.sites.hand", "HandSite"),
    "hip": ("cohort.sites.hip", "HipSite"),
}
SITE_NAMES = tuple(_REGISTRY)


def get_site(name: str) -> Site:
    try:
        module, cls = _REGISTRY[name]
    except KeyError:
        from osteofy.errors import UsageError

        raise UsageError(f"unknown site {name!r} (choose from {', '.join(SITE_NAMES)})") from None
    site: Site = getattr(importlib.import_module(module), cls)()
    return site
