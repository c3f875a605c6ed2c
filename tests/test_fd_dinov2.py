"""FD_DINOv2's network: DINOv2 through timm by the dgm-eval protocol, on a tiny random ViT of its family."""

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms as T
from PIL import Image
from timm.models import save_for_hf

from redi.errors import ReDiError
from redi.metrics.dinov2 import ARCH, load_dinov2

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}  # vit_large_patch14_dinov2 with fewer, smaller blocks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A randomly initialised DINOv2-family ViT saved as a timm folder and as one weights file."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, img_size=224, num_classes=0, **TINY).eval()
    with torch.no_grad():  # leave the zero/one inits: a non-trivial CLS token and norm
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    root = tmp_path_factory.mktemp("dinov2")
    save_for_hf(model, root / "folder", model_args={"img_size": 224, "num_classes": 0, **TINY})
    torch.save(model.state_dict(), root / "tiny.pth")
    return model, root


def dgm_eval_features(model, images):
    """The dgm-eval recipe, independently: torchvision Resize(224, bicubic) on PIL, ToTensor, Normalize,
    then the model's pooled output (the CLS token after the final norm)."""
    transform = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    x = torch.stack([transform(Image.fromarray(image)) for image in images])
    with torch.no_grad():
        return model(x).numpy()


def test_features_follow_the_dgm_eval_protocol_from_a_folder_and_a_file(tiny):
    model, root = tiny
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    expected = dgm_eval_features(model, images)
    from_folder = load_dinov2(str(root / "folder"))
    from_file = load_dinov2(str(root / "tiny.pth"), **TINY)
    assert from_folder.dim == 32 and expected.shape == (3, 32)
    np.testing.assert_allclose(from_folder(images).numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(from_file(images).numpy(), expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(expected[0], expected[1])  # the images are told apart


def test_missing_or_wrong_weights_are_named(tiny, tmp_path):
    _, root = tiny
    with pytest.raises(ReDiError, match="fd_dinov2.weights: /nowhere/dinov2.pth not found"):
        load_dinov2("/nowhere/dinov2.pth")
    with pytest.raises(ReDiError, match="could not load DINOv2 for FD_DINOv2 from .*tiny.pth"):
        load_dinov2(str(root / "tiny.pth"), **{**TINY, "embed_dim": 64})  # other shapes than the file's
