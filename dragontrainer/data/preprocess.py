"""Preprocessing fitted on the training split only, saved with the run, applied identically later.

Pixels are first scaled to [0, 1]; statistics are of the training split in that scale. Every
preprocessor's fitted state is a dict of tensors (`preprocess.safetensors` in the run folder).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dragontrainer.errors import RecipeError
from dragontrainer.recipe import PreprocessSpec
from dragontrainer.registry import Registry


class Preprocessor:
    """Maps uint8 NCHW images to float32 network inputs. Subclasses fit named tensors in `state`."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self.state: dict[str, torch.Tensor] = {}
        self._device_state: tuple[torch.device, dict[str, torch.Tensor]] | None = None  # state on x's device

    def fit(self, x: torch.Tensor) -> Preprocessor:
        self.state = {k: v.float() for k, v in self.compute(x.double().div(255.0)).items()}
        self._device_state = None
        return self

    def compute(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The statistics, from float64 pixels in [0, 1] (float64: sums over millions of pixels)."""
        return {}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> network inputs."""
        return self.normalize(x.float().div(255.0))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels already in [0, 1] (e.g. augmented) -> network inputs."""
        if self._device_state is None or self._device_state[0] != x.device:
            self._device_state = (x.device, {k: v.to(x.device) for k, v in self.state.items()})
        return self.transform(x, self._device_state[1])

    def transform(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return x

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = dict(state)
        self._device_state = None


PREPROCESSORS: Registry[Callable[[PreprocessSpec], Preprocessor]] = Registry("preprocess")


def _per_channel(stat: torch.Tensor) -> torch.Tensor:
    return stat.view(1, -1, 1, 1)


@PREPROCESSORS.register("none")
class Unit(Preprocessor):
    """Pixels scaled to [0, 1]; nothing fitted."""


@PREPROCESSORS.register("center_channel")
class CenterChannel(Preprocessor):
    """Zero-centre: subtract the per-channel mean of the training split (VGG style)."""

    def compute(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mean": x.mean((0, 2, 3))}

    def transform(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return x - _per_channel(state["mean"])


@PREPROCESSORS.register("center_pixel")
class CenterPixel(Preprocessor):
    """Zero-centre: subtract the mean image of the training split (AlexNet style)."""

    def compute(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mean": x.mean(0)}

    def transform(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return x - state["mean"]


@PREPROCESSORS.register("standardize")
class Standardize(Preprocessor):
    """Zero-centre and divide by the std, per channel (the default)."""

    def compute(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = x.transpose(0, 1).reshape(x.shape[1], -1)
        return {"mean": pixels.mean(1), "std": pixels.std(1).clamp_min(1e-6)}  # a constant channel: no /0

    def transform(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return (x - _per_channel(state["mean"])) / _per_channel(state["std"])


@PREPROCESSORS.register("standardize_pixel")
class StandardizePixel(Preprocessor):
    """Zero-centre and divide by the std, per pixel position and channel."""

    def compute(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mean": x.mean(0), "std": x.std(0).clamp_min(1e-3)}  # never-lit pixels: no blow-up

    def transform(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return (x - state["mean"]) / state["std"]


@PREPROCESSORS.register("minmax")
class MinMax(Preprocessor):
    """Scale each channel from the training split's [min, max] to [−1, 1]."""

    def compute(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"low": x.amin((0, 2, 3)), "high": x.amax((0, 2, 3))}

    def transform(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        low, span = _per_channel(state["low"]), _per_channel((state["high"] - state["low"]).clamp_min(1e-6))
        return (x - low) / span * 2.0 - 1.0


class Whiten(Preprocessor):
    """PCA on the centred, flattened training images: U, S of the covariance; whitening divides the
    rotated data by √(S + eps) (CS231n: `Xwhite = Xrot / np.sqrt(S + 1e-5)`)."""

    zca = False

    def compute(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = x.reshape(len(x), -1)
        if flat.shape[1] > self.spec.max_features:
            raise RecipeError(
                f"preprocess.name={self.spec.name}: {flat.shape[1]} features (C·H·W) exceed preprocess.max_features "
                f"({self.spec.max_features}); the covariance is D×D — lower data.image_size or raise the limit"
            )
        mean = flat.mean(0)
        centred = flat - mean
        covariance = centred.T @ centred / max(len(flat) - 1, 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending; symmetric PSD
        order = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        s, u = order
        matrix = u / torch.sqrt(s + self.spec.eps)  # x_rot / √(S + eps) = x @ U diag(1/√(S+eps))
        if self.zca:
            matrix = matrix @ u.T  # rotate back to pixel space: whitened data that still looks like images
        return {"mean": mean, "matrix": matrix}

    def transform(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        flat = x.flatten(1) - state["mean"]  # flatten, not reshape(len(x), ...): exports keep the batch free
        return (flat @ state["matrix"]).reshape_as(x)


@PREPROCESSORS.register("pca_whiten")
class PcaWhiten(Whiten):
    """PCA whitening: decorrelate and scale each principal component to unit variance (eps 1e-5)."""


@PREPROCESSORS.register("zca_whiten")
class ZcaWhiten(Whiten):
    """ZCA whitening: PCA whitening rotated back to pixel space (Bell & Sejnowski 1997), eps 1e-5."""

    zca = True


def create_preprocessor(spec: PreprocessSpec) -> Preprocessor:
    return PREPROCESSORS.get(spec.name)(spec)
