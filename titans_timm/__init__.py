"""titans-timm: memory-augmented Vision Transformers (Titans neural memory) as timm models.

``import titans_timm`` registers the 27 models ``vit_{tiny,small,base}_{mal,mac,mag}_{mlp,simple,advanced}``
with timm, so ``timm.create_model('vit_small_mac_simple', pretrained=True)`` works.
"""
__version__ = '0.1.0'
from .memory import MEMORY_TYPES, TitansMemory, create_memory
from . import vit  # registers the 27 models with timm
from .vit import TitansVisionTransformer, memory_modules, split_parameters
