"""Small models and utilities shared by the tests."""
import torch


def tiny_vit(img=32, patch=8, dim=32, depth=3, heads=2, classes=10, mlp_ratio=2.0, layer_scale=False, **kw):
    """A small timm VisionTransformer with a class token (random weights incl. biases and LayerScale, eval mode)."""
    from timm.models.vision_transformer import VisionTransformer

    if layer_scale:
        kw.setdefault("init_values", 0.7)
    m = VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                          num_classes=classes, mlp_ratio=mlp_ratio, qkv_bias=True, **kw)
    # timm initialises biases to 0: give every parameter some random value so that bias paths are exercised.
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
            elif n.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return m.eval()


# The small Swin of most Swin tests: 32 px, patch 2 (stages on 16x16, 8x8, 4x4 maps), window 4, head dim 16.
SWIN_CFG = dict(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=4,
                mlp_ratio=2.0, num_classes=10)


def tiny_swin(rel_pos_std=0.5, timm_name=None, **kw):
    """A small timm SwinTransformer (``SWIN_CFG`` updated by ``kw``; random biases and relative position tables,
    eval mode); with ``timm_name``, made by ``timm.create_model(timm_name, ...)`` (its name and pretrained cfg)."""
    import timm
    from timm.models.swin_transformer import SwinTransformer

    cfg = {**SWIN_CFG, **kw}
    m = SwinTransformer(**cfg) if timm_name is None else timm.create_model(timm_name, pretrained=False, **cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
            elif n.endswith("relative_position_bias_table"):
                p.normal_(0, rel_pos_std)
    return m.eval()


def randomise_conv_state(model, head_probs_std):
    """Non-trivial BatchNorm statistics and head mixing, so that folding matters (``head_probs_std`` of the order of
    the head-mixing temperature: 0.02 for DeiT's alpha 0.01, 60 for Swin's alpha 100)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            if hasattr(m, "head_probs"):
                m.head_probs.add_(head_probs_std * torch.randn_like(m.head_probs))
    return model


class TinyFamily:
    """A model family as the generic tests see it: a small timm model of it, an architecture with every attention
    choice, images of its size. ``name`` is the family's name in spvit (``spvit.family_of(model).name``)."""

    def __init__(self, name, make, choices, keep, img, head_probs_std, richest=None):
        self.name, self._make, self.choices, self.keep = name, make, list(choices), [list(k) for k in keep]
        self.img, self.head_probs_std = img, head_probs_std
        self.richest = dict(richest or {})  # model() keywords of the variant with the most parts (ViT: LayerScale)

    def __repr__(self):
        return self.name

    def model(self, **kw):
        return self._make(**kw)

    def images(self, b=2):
        return torch.randn(b, 3, self.img, self.img)

    def architecture(self, model):
        from spvit.arch import Architecture
        from spvit.models.convert import model_name_of, signature_of

        return Architecture.from_choices(model_name_of(model), signature_of(model), self.choices, self.keep)

    def pruned(self, official_skip=False, **kw):
        """The pruned model of :meth:`architecture` with non-trivial conv state (eval mode)."""
        import warnings

        import spvit

        m = self.model(**kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the official-skip notice
            return randomise_conv_state(spvit.prune(m, self.architecture(m), official_skip=official_skip),
                                        self.head_probs_std).eval()


FAMILIES = {
    # depth 4: every choice, FFN widths uneven, 0, odd and nearly full (of 64)
    "vit": TinyFamily("vit", lambda **kw: tiny_vit(**{"depth": 4, **kw}), ["3x3", "msa", "1x1", "skip"],
                      [range(0, 64, 2), [], [1, 2, 5], range(63)], 32, 0.02, richest={"layer_scale": True}),
    # stage 1 [msa, 3x3 (shifted block: full-map conv)], stage 2 [1x1, msa (shifted)], stage 3 [skip, msa]
    "swin": TinyFamily("swin", tiny_swin, ["msa", "3x3", "1x1", "msa", "skip", "msa"],
                       [range(0, 64, 2), [1, 2, 5], [], range(128), range(10), range(0, 256, 3)], 32, 60.0),
}


def randomise_bn(model, seed=0):
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.1)


def randomise_head_probs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("head_probs"):
                p.copy_(1 + 0.02 * torch.randn(p.shape, generator=g))
