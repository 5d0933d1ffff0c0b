"""Segmentation networks as pretrained classifiers: their encoder, pooled, under a new linear head.

Most pretrained 3D networks MONAI users hold are segmentation models (model-zoo bundles, MONAI's
self-supervised Swin-ViT). Each class here builds MONAI's own segmentation network with the same
size arguments and keeps only its encoder half, **under the attribute names the segmentation
network uses**, so a checkpoint of the whole network loads by name into it: encoder tensors load,
decoder tensors are reported as unexpected. The deepest features are average-pooled into a new
``fc`` layer with one output per class. ``medtl.networks`` registers each as an architecture
(``segresnet-encoder``, ``unet-encoder``, ``monai-unet-encoder``, ``swinunetr-encoder``) with its
first convolution, classifier and layer groups, so head swap, freezing and discriminative learning
rates work as for the classification networks.

Examples:
    A BraTS SegResNet's encoder as a 2-class tumour grader::

        model = SegResNetEncoder(in_channels=4, num_classes=2, init_filters=16)
        report = load_weights(model, "brats_mri_segmentation/models/model.pt")
        report.unexpected   # up_layers.*, up_samples.*, conv_final.* (the decoder, ignored)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers import Pool
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import BasicUNet, SegResNet, SwinUNETR, UNet
from monai.utils import ensure_tuple_rep
from torch import nn

__all__ = ["BasicUNetEncoder", "SegResNetEncoder", "SwinUNETREncoder", "UNetEncoder"]


class _PooledHead(nn.Module):
    """Global average pooling of the deepest features into ``fc``, shared by every encoder."""

    def _add_head(self, spatial_dims: int, features: int, num_classes: int) -> None:
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.fc = nn.Linear(features, num_classes)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(features), 1))


class SegResNetEncoder(_PooledHead):
    """MONAI ``SegResNet``'s encoder (``convInit``, ``down_layers``) with a pooled linear classifier.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: classifier outputs.
        init_filters, blocks_down, norm, act, dropout_prob: as for ``SegResNet``; they must be the
            checkpoint's for its encoder tensors to fit (``blocks_up`` and ``upsample_mode`` shape
            only the decoder, which is not built).

    Examples:
        >>> model = SegResNetEncoder(spatial_dims=3, in_channels=1, num_classes=2, init_filters=8)
        >>> model(torch.zeros(1, 1, 32, 32, 32)).shape
        torch.Size([1, 2])
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_classes: int = 2,
        init_filters: int = 8,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        norm: tuple | str = ("GROUP", {"num_groups": 8}),
        act: tuple | str = ("RELU", {"inplace": True}),
        dropout_prob: float | None = None,
    ) -> None:
        super().__init__()
        seg = SegResNet(
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=1,
            dropout_prob=dropout_prob,
            act=act,
            norm=norm,
            blocks_down=tuple(blocks_down),
            blocks_up=(),  # no decoder
        )
        self.convInit = seg.convInit
        self.dropout = seg.dropout if dropout_prob is not None else None
        self.down_layers = seg.down_layers
        self._add_head(spatial_dims, init_filters * 2 ** (len(blocks_down) - 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convInit(x)
        if self.dropout is not None:
            x = self.dropout(x)
        for down in self.down_layers:
            x = down(x)
        return self.classify(x)


class BasicUNetEncoder(_PooledHead):
    """MONAI ``BasicUNet``'s encoder (``conv_0``, ``down_1`` ... ``down_4``) with a pooled linear classifier.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: classifier outputs.
        features, act, norm, bias, dropout: as for ``BasicUNet`` (six ``features``, as the
            segmentation network's config gives them; the encoder uses the first five).
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_classes: int = 2,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        bias: bool = True,
        dropout: float | tuple = 0.0,
    ) -> None:
        super().__init__()
        seg = BasicUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=1,
            features=tuple(features),
            act=act,
            norm=norm,
            bias=bias,
            dropout=dropout,
        )
        self.conv_0 = seg.conv_0
        self.down_1 = seg.down_1
        self.down_2 = seg.down_2
        self.down_3 = seg.down_3
        self.down_4 = seg.down_4
        self._add_head(spatial_dims, ensure_tuple_rep(features, 6)[4], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.down_4(self.down_3(self.down_2(self.down_1(self.conv_0(x))))))


class UNetEncoder(_PooledHead):
    """MONAI ``UNet``'s contracting path with a pooled linear classifier.

    MONAI's ``UNet`` nests its levels: ``model`` is ``Sequential(down, SkipConnection(inner), up)``
    and ``inner`` the same one level deeper, down to the bottom layer. This builds that network,
    removes every ``up`` (index 2) and makes each skip connection a plain step deeper, so the down
    layers keep their names (``model.0``, ``model.1.submodule.0``, ...) and the up path's tensors of
    a checkpoint are unexpected.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: classifier outputs.
        channels, strides, kernel_size, num_res_units, act, norm, dropout, bias, adn_ordering: as
            for ``UNet`` (``up_kernel_size`` shapes only the up path, which is removed).
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        strides: Sequence[int] = (2, 2, 2, 2),
        kernel_size: Sequence[int] | int = 3,
        num_res_units: int = 0,
        act: tuple | str = "PRELU",
        norm: tuple | str = "INSTANCE",
        dropout: float = 0.0,
        bias: bool = True,
        adn_ordering: str = "NDA",
    ) -> None:
        super().__init__()
        seg = UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=1,
            channels=tuple(channels),
            strides=tuple(strides),
            kernel_size=kernel_size,
            num_res_units=num_res_units,
            act=act,
            norm=norm,
            dropout=dropout,
            bias=bias,
            adn_ordering=adn_ordering,
        )
        self.model = seg.model
        level = self.model
        while isinstance(level, nn.Sequential) and len(level) == 3 and isinstance(level[1], SkipConnection):
            del level[2]  # the up path of this level
            level[1] = _Deeper(level[1].submodule)
            level = level[1].submodule
        self._add_head(spatial_dims, channels[-1], num_classes)

    def level_paths(self) -> list[str]:
        """Module paths of the down layers, input to output, the bottom layer last."""
        paths, path, level = [], "model", self.model
        while isinstance(level, nn.Sequential) and len(level) == 2 and isinstance(level[1], _Deeper):
            paths.append(f"{path}.0")
            path, level = f"{path}.1.submodule", level[1].submodule
        return [*paths, path]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.model(x))


class _Deeper(nn.Module):
    """Where MONAI's UNet concatenates a level's input with the deeper levels' output
    (``SkipConnection``), the encoder only goes deeper; ``submodule`` keeps the checkpoint's names."""

    def __init__(self, submodule: nn.Module) -> None:
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.submodule(x)


class SwinUNETREncoder(_PooledHead):
    """MONAI ``SwinUNETR``'s Swin transformer (``swinViT``) with a pooled linear classifier.

    The deepest stage's features (16 x ``feature_size`` channels, 1/32 of the input size), layer
    normalised as SwinUNETR does (``normalize``), are average-pooled into ``fc``. MONAI's
    self-supervised ``model_swinvit.pt`` (``module.patch_embed.*``, ``module.layers1.0.*``, ...)
    is mapped onto ``swinViT.*`` by ``medtl.weights.load_weights``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: classifier outputs.
        feature_size: as for ``SwinUNETR`` (48 for ``model_swinvit.pt``); so are ``patch_size``,
            ``depths``, ``num_heads``, ``window_size``, ``qkv_bias``, ``mlp_ratio``, ``drop_rate``,
            ``attn_drop_rate``, ``dropout_path_rate``, ``normalize``, ``patch_norm``,
            ``use_checkpoint``, ``downsample`` and ``use_v2``.
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_classes: int = 2,
        feature_size: int = 24,
        patch_size: int = 2,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: Sequence[int] | int = 7,
        qkv_bias: bool = True,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        normalize: bool = True,
        patch_norm: bool = False,
        use_checkpoint: bool = False,
        downsample: str = "merging",
        use_v2: bool = False,
    ) -> None:
        super().__init__()
        seg = SwinUNETR(
            in_channels=in_channels,
            out_channels=1,
            patch_size=patch_size,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size if isinstance(window_size, int) else tuple(window_size),
            qkv_bias=qkv_bias,
            mlp_ratio=mlp_ratio,
            feature_size=feature_size,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            dropout_path_rate=dropout_path_rate,
            normalize=normalize,
            patch_norm=patch_norm,
            use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims,
            downsample=downsample,
            use_v2=use_v2,
        )
        self.swinViT = seg.swinViT
        self.normalize = normalize
        self._add_head(spatial_dims, 16 * feature_size, num_classes)  # four stages, each merging doubles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.swinViT(x, self.normalize)[-1])
