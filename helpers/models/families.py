"""Imports every family module so that each registers its names. Add new families here."""

from . import timm_family  # noqa: F401
from . import clip_family  # noqa: F401
