"""Fixtures shared by the trainer tests."""
import pytest
import timm
import torch

from titans_timm import checkpoint as ckpt

# the tiny ViT structure the trainer tests use (a real timm ViT, just small)
TINY_STRUCT = dict(img_size=32, patch_size=8, depth=2)


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on shared cores spinning OpenMP threads cost a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def backbone(tmp_path_factory):
    """A plain timm ViT checkpoint (random weights) with the tiny structure, as the trainer writes them."""
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', num_classes=10, **TINY_STRUCT)
    path = tmp_path_factory.mktemp('backbone') / 'model.safetensors'
    ckpt.save_model(model, path, architecture='vit_tiny_patch16_224', model_args=dict(TINY_STRUCT, num_classes=10))
    return path
