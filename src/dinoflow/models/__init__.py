"""Backbones (timm), their pretrained weights, and attention / saliency maps."""

from dinoflow.models.attention import cls_attention, feature_saliency, heads_to_grid
from dinoflow.models.encoder import Encoder
from dinoflow.models.factory import create_encoder, encoder_from_files, load_encoder, save_encoder
from dinoflow.models.weights import load_into_encoder, load_pretrained

__all__ = ["Encoder", "create_encoder", "load_encoder", "save_encoder", "encoder_from_files", "load_pretrained",
           "load_into_encoder", "cls_attention", "feature_saliency", "heads_to_grid"]
