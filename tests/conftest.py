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


def save_backbone(folder, struct, num_classes: int = 10):
    """Write a plain timm ViT checkpoint (random weights, seed 0) with ``struct``; returns its path."""
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', num_classes=num_classes, **struct)
    path = folder / 'model.safetensors'
    ckpt.save_model(model, path, architecture='vit_tiny_patch16_224', model_args=dict(struct, num_classes=num_classes))
    return path


def check_bad_input(capsys, main, argv, expect: str) -> str:
    """``main(argv)`` exits with status 2 and prints exactly one ``error:`` line containing ``expect``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: '), err
    assert expect in err[0], err[0]
    return err[0]


@pytest.fixture(scope='module')
def backbone(tmp_path_factory):
    """A plain timm ViT checkpoint (random weights) with the tiny structure, as the trainer writes them."""
    return save_backbone(tmp_path_factory.mktemp('backbone'), TINY_STRUCT)
