"""Imports every family module so that each registers its names. Add new families here."""

from . import timm_family  # noqa: F401
from . import clip_family  # noqa: F401
from . import torchvision_family  # noqa: F401
from . import dinov2_family  # noqa: F401
from . import hf_family  # noqa: F401
from . import facenet_family  # noqa: F401
