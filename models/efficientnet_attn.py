"""Paper 002: EfficientNet-B0 + multi-head self-attention + dense head, top layers trainable."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from leukfed.models.registry import register_model
from leukfed.models.timm_models import timm_data_config, timm_hub_tag

# Keras' "top 20 layers" of EfficientNetB0 are block7a, the top conv/BN and the tail of block6d;
# in timm that is the last block of stage 6, stage 7, conv_head and bn2.
TRAINABLE_BACKBONE = ("blocks.5.3.", "blocks.6.", "conv_head.", "bn2.")


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with residual.

    Pre-LayerNorm (our addition) keeps the attention logits sane on unnormalised features.
    """

    def __init__(self, dim: int, num_heads: int = 4, head_dim: int = 64) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, _ = tokens.shape
        qkv = self.qkv(self.norm(tokens)).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return tokens + self.proj(out)


class EfficientNetB0Attention(nn.Module):
    """EfficientNet-B0 features -> self-attention -> GAP -> 256 -> 128 -> logits."""

    def __init__(self, num_classes: int, *, pretrained_backbone: bool = False) -> None:
        super().__init__()
        self.backbone = timm.create_model(
            "efficientnet_b0", pretrained=pretrained_backbone, num_classes=0, global_pool=""
        )
        dim = self.backbone.num_features
        self.attn = SpatialSelfAttention(dim)
        self.head = nn.Sequential(
            nn.Linear(dim, 256),
            nn.LeakyReLU(0.1),
            nn.BatchNorm1d(256),
            nn.Dropout(0.5),
            nn.Linear(256, 128),
            nn.LeakyReLU(0.1),
            nn.BatchNorm1d(128),
            nn.Dropout(0.3),
        )
        self.fc = nn.Linear(128, num_classes)
        self.freeze_backbone()
        self.train()  # puts the frozen BatchNorms in eval mode from the start

    def freeze_backbone(self, trainable: tuple[str, ...] = TRAINABLE_BACKBONE) -> None:
        """requires_grad=False for every backbone parameter outside `trainable` prefixes."""
        for name, p in self.backbone.named_parameters():
            p.requires_grad = name.startswith(trainable)

    def train(self, mode: bool = True) -> EfficientNetB0Attention:
        super().train(mode)
        # Frozen BatchNorms keep their running statistics, as Keras does for frozen layers.
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in m.parameters()
            ):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone.forward_features(x)  # (B, C, H, W)
        tokens = self.attn(fmap.flatten(2).transpose(1, 2))
        return self.fc(self.head(tokens.mean(dim=1)))


@register_model(
    "efficientnet_b0_attn",
    data_config=timm_data_config("efficientnet_b0"),
    classifier="fc",
    hub_tag=timm_hub_tag("efficientnet_b0"),
    description="paper 002: EfficientNet-B0 + MHSA + dense 256/128 head, top layers trainable",
)
def efficientnet_b0_attn(num_classes: int, image_size: int, hub: bool) -> nn.Module:
    return EfficientNetB0Attention(num_classes, pretrained_backbone=hub)
