"""``facenet-vggface2``: face-identity embeddings (FaceNet, Schroff et al. 2015) from an Inception-ResNet-v1
(Szegedy et al. 2017) trained on VGGFace2 (Cao et al. 2018), over detected and aligned face crops.

Network: Inception-ResNet-v1 defined here (the public architecture, with the parameter names of the widely used
PyTorch port, so that its published VGGFace2 state dict ``20180402-114759-vggface2.pt`` loads unchanged; the
``facenet-pytorch`` package itself pins torch<2.3 and Pillow<10.3 and cannot be a requirement). Embedding: global
pooling of the 1792-channel map -> ``last_linear`` (1792 -> 512, no bias) -> ``last_bn``: 512-d. ``--pool gap``
(default, as trained) ``|gem|max`` changes only the global pooling. Input: 160x160, fixed standardisation
``(x - 127.5) / 128`` (on 0..255 pixels), as the weights were trained.

Weights: ``pretrained`` downloads the state dict through ``torch.hub.load_state_dict_from_url`` from
:data:`VGGFACE2_URL`; offline, download that file elsewhere and pass it with ``--weights PATH`` (its classifier,
``logits.*``, is ignored).

Faces (option ``face``): ``detect`` (default) finds the largest frontal face with OpenCV's Haar cascade (shipped
inside ``opencv-python-headless``, no download), levels the eyes when the eye cascade finds two (in-plane rotation
about the face centre), and crops the face box with a 20% margin. This replaces the MTCNN detector of the original
pipeline: MTCNN also crops a margin around its box; it places the box more tightly and works on more poses.
Fall-back: where no face is found, where OpenCV is not installed, or with ``face="none"``, the whole image is used
(centre square crop, resized to 160). :func:`FaceCropper.stats` counts detections and fall-backs per process.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from .pooling import GeM, pool_map
from .registry import ModelError, ModelSpec, Preprocessing, pretrained_download_error, register

logger = logging.getLogger(__name__)

#: The published VGGFace2 state dict of the PyTorch port (8,631 identities in its classifier).
VGGFACE2_URL = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt"
FACE_INPUT = 160
#: ``(x - 127.5) / 128`` on 0..255 pixels, written as a normalisation of ToTensor's 0..1 values.
FACE_MEAN = (127.5 / 255,) * 3
FACE_STD = (128 / 255,) * 3
FACE_MODES = ("detect", "none")


# ----------------------------------------------------------------------------------------------------------------
# Inception-ResNet-v1
# ----------------------------------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as in the TensorFlow original) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _branch(*layers: tuple) -> nn.Module:
    """One branch: a single ConvBN, or a Sequential of them."""
    convs = [ConvBN(*layer) for layer in layers]
    return convs[0] if len(convs) == 1 else nn.Sequential(*convs)


class ResidualBlock(nn.Module):
    """Block35 / Block17 / Block8: parallel branches, concatenated, a 1x1 conv back to ``channels``, scaled and
    added to the input, then ReLU (the very last block has none)."""

    def __init__(self, channels: int, branches: list[list[tuple]], scale: float, relu: bool = True) -> None:
        super().__init__()
        self.n_branches = len(branches)
        for i, layers in enumerate(branches):
            setattr(self, f"branch{i}", _branch(*layers))
        width = sum(layers[-1][1] for layers in branches)
        self.conv2d = nn.Conv2d(width, channels, kernel_size=1)
        self.scale, self.relu = scale, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.n_branches)], dim=1)
        out = x + self.scale * self.conv2d(out)
        return F.relu(out) if self.relu else out


class Reduction(nn.Module):
    """Mixed_6a / Mixed_7a: strided conv branches plus a 3x3/2 max-pool branch, concatenated."""

    def __init__(self, branches: list[list[tuple]]) -> None:
        super().__init__()
        self.n_branches = len(branches)
        for i, layers in enumerate(branches):
            setattr(self, f"branch{i}", _branch(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [getattr(self, f"branch{i}")(x) for i in range(self.n_branches)]
        return torch.cat(outs + [F.max_pool2d(x, 3, stride=2)], dim=1)


def _block35() -> ResidualBlock:
    return ResidualBlock(256, [[(256, 32, 1)], [(256, 32, 1), (32, 32, 3, 1, 1)],
                               [(256, 32, 1), (32, 32, 3, 1, 1), (32, 32, 3, 1, 1)]], scale=0.17)


def _block17() -> ResidualBlock:
    return ResidualBlock(896, [[(896, 128, 1)], [(896, 128, 1), (128, 128, (1, 7), 1, (0, 3)),
                                                 (128, 128, (7, 1), 1, (3, 0))]], scale=0.10)


def _block8(scale: float = 0.20, relu: bool = True) -> ResidualBlock:
    return ResidualBlock(1792, [[(1792, 192, 1)], [(1792, 192, 1), (192, 192, (1, 3), 1, (0, 1)),
                                                   (192, 192, (3, 1), 1, (1, 0))]], scale=scale, relu=relu)


class InceptionResnetV1(nn.Module):
    """Inception-ResNet-v1 face embedder: (B, 3, 160, 160) standardised faces -> (B, 512) (before L2)."""

    def __init__(self, pool: str = "gap") -> None:
        super().__init__()
        if pool not in ("gap", "gem", "max"):
            raise ModelError(f"facenet-vggface2 takes --pool gap|gem|max, not {pool!r}")
        self.conv2d_1a = ConvBN(3, 32, 3, stride=2)
        self.conv2d_2a = ConvBN(32, 32, 3)
        self.conv2d_2b = ConvBN(32, 64, 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = ConvBN(64, 80, 1)
        self.conv2d_4a = ConvBN(80, 192, 3)
        self.conv2d_4b = ConvBN(192, 256, 3, stride=2)
        self.repeat_1 = nn.Sequential(*[_block35() for _ in range(5)])
        self.mixed_6a = Reduction([[(256, 384, 3, 2)], [(256, 192, 1), (192, 192, 3, 1, 1), (192, 256, 3, 2)]])
        self.repeat_2 = nn.Sequential(*[_block17() for _ in range(10)])
        self.mixed_7a = Reduction([[(896, 256, 1), (256, 384, 3, 2)], [(896, 256, 1), (256, 256, 3, 2)],
                                   [(896, 256, 1), (256, 256, 3, 1, 1), (256, 256, 3, 2)]])
        self.repeat_3 = nn.Sequential(*[_block8() for _ in range(5)])
        self.block8 = _block8(scale=1.0, relu=False)
        self.last_linear = nn.Linear(1792, 512, bias=False)
        self.last_bn = nn.BatchNorm1d(512, eps=1e-3, momentum=0.1)
        self.pool = pool
        self.gem = GeM() if pool == "gem" else None
        self.embed_dim = 512
        self.face = "detect"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The 1792-channel map (3x3 at 160 px)."""
        for name in ("conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a", "conv2d_4b",
                     "repeat_1", "mixed_6a", "repeat_2", "mixed_7a", "repeat_3", "block8"):
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = pool_map(self.forward_features(x), self.pool, self.gem)
        return self.last_bn(self.last_linear(pooled))

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept the published file: its identity classifier (``logits.*``) is not part of the embedder."""
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}
        if self.gem is not None and "gem.p" not in state:
            state["gem.p"] = self.gem.p.detach().clone()
        if self.gem is None:
            state.pop("gem.p", None)
        return state

    def wrap_transform(self, base: Callable) -> Callable:
        """Face detection and alignment before the tensor transform (``face="detect"``)."""
        return FaceTransform(FaceCropper() if self.face == "detect" else None, base)


# ----------------------------------------------------------------------------------------------------------------
# Face detection and alignment
# ----------------------------------------------------------------------------------------------------------------
class FaceCropper:
    """Largest frontal face (OpenCV Haar cascade), eyes levelled, cropped with a margin; ``None`` if no face.

    ``margin`` is a fraction of the face box added on each side (0.2, close to the 32 px at 160 px of FaceNet's
    MTCNN crops). Picklable: the cascades are loaded lazily in each worker process.
    """

    stats: dict[str, int] = {"faces": 0, "fallback": 0}

    def __init__(self, margin: float = 0.2, align: bool = True, min_size: int = 24) -> None:
        self.margin, self.align, self.min_size = margin, align, min_size
        self._face = self._eyes = None
        self._unavailable = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_face"] = state["_eyes"] = None
        return state

    def _load(self) -> bool:
        if self._face is not None:
            return True
        if self._unavailable:
            return False
        try:
            import cv2
        except ImportError:
            logger.warning("OpenCV (opencv-python-headless) is not installed: facenet-vggface2 embeds whole images")
            self._unavailable = True
            return False
        root = cv2.data.haarcascades
        self._face = cv2.CascadeClassifier(root + "haarcascade_frontalface_default.xml")
        self._eyes = cv2.CascadeClassifier(root + "haarcascade_eye.xml")
        if self._face.empty():
            logger.warning("OpenCV's face cascade could not be read: facenet-vggface2 embeds whole images")
            self._face, self._unavailable = None, True
            return False
        return True

    def detect(self, image) -> tuple[int, int, int, int] | None:
        """The largest face box ``(x, y, w, h)`` in a PIL image, or ``None``."""
        import numpy as np

        if not self._load():
            return None
        gray = np.asarray(image.convert("L"))
        faces = self._face.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                            minSize=(self.min_size, self.min_size))
        if len(faces) == 0:
            return None
        x, y, w, h = max(faces, key=lambda b: b[2] * b[3])
        return int(x), int(y), int(w), int(h)

    def eye_angle(self, image, box: tuple[int, int, int, int]) -> float:
        """Degrees to rotate (counter-clockwise) so that the eyes are level; 0 when two eyes are not found."""
        import numpy as np

        x, y, w, h = box
        upper = np.asarray(image.convert("L").crop((x, y, x + w, y + h // 2 + h // 8)))
        eyes = self._eyes.detectMultiScale(upper, scaleFactor=1.1, minNeighbors=5, minSize=(w // 10, w // 10))
        if len(eyes) < 2:
            return 0.0
        two = sorted(sorted(eyes, key=lambda e: e[2] * e[3], reverse=True)[:2], key=lambda e: e[0])
        (lx, ly, lw, lh), (rx, ry, rw, rh) = two
        dx = (rx + rw / 2) - (lx + lw / 2)
        dy = (ry + rh / 2) - (ly + lh / 2)
        if dx < w / 5:  # the same eye twice, or not a pair of eyes
            return 0.0
        angle = math.degrees(math.atan2(dy, dx))
        return angle if abs(angle) <= 30 else 0.0

    def __call__(self, image):
        box = self.detect(image)
        if box is None:
            FaceCropper.stats["fallback"] += 1
            return None
        FaceCropper.stats["faces"] += 1
        x, y, w, h = box
        if self.align:
            angle = self.eye_angle(image, box)
            if angle:
                from PIL import Image

                image = image.rotate(angle, resample=Image.BILINEAR, center=(x + w / 2, y + h / 2))
        m = self.margin
        left, top = max(0, round(x - m * w)), max(0, round(y - m * h))
        right, bottom = min(image.width, round(x + w + m * w)), min(image.height, round(y + h + m * h))
        return image.crop((left, top, right, bottom))


class FaceTransform:
    """Face crop (when a face is found) then the tensor transform; the whole image otherwise."""

    def __init__(self, cropper: FaceCropper | None, base: Callable) -> None:
        self.cropper, self.base = cropper, base

    def __call__(self, image):
        face = self.cropper(image) if self.cropper is not None else None
        return self.base(face if face is not None else image)


# ----------------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------------
def _build(spec: ModelSpec, weights: str, options: dict[str, Any]) -> nn.Module:
    face = options.get("face", "detect")
    if face not in FACE_MODES:
        raise ModelError(f"facenet-vggface2 takes face={'|'.join(FACE_MODES)}, not {face!r}")
    network = InceptionResnetV1(options.get("pool", spec.default_pool))
    network.face = face
    if weights == "pretrained":
        try:
            state = torch.hub.load_state_dict_from_url(VGGFACE2_URL, map_location="cpu", weights_only=True,
                                                       progress=False)
        except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, OSError...
            raise pretrained_download_error(spec.name, VGGFACE2_URL, exc, "the file 20180402-114759-vggface2.pt") from None
        missing, unexpected = network.load_state_dict(network.adapt_state_dict(state), strict=False)
        if missing or unexpected:
            raise ModelError(f"the VGGFace2 file does not fit InceptionResnetV1: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    else:
        for module in network.modules():  # TF-slim style init, so that random embeddings are not degenerate
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return network


register(
    ModelSpec(
        name="facenet-vggface2",
        family="face",
        embed_dim=512,
        preprocessing=Preprocessing(FACE_INPUT, FACE_MEAN, FACE_STD, interpolation="bilinear", crop_pct=1.0),
        build=_build,
        description="FaceNet Inception-ResNet-v1, VGGFace2 weights, on detected+aligned face crops "
                    "(whole image where none is found); --pool gap (default)|gem|max, face=detect|none",
        default_pool="gap",
        pools=("gap", "gem", "max"),
        channels_last=True,
        options=("pool", "face"),
    )
)
