"""Small models and utilities shared by the tests."""
import torch


def tiny_vit(img=32, patch=8, dim=32, depth=3, heads=2, classes=10, mlp_ratio=2.0, **kw):
    """A small timm VisionTransformer with a class token (random weights, eval mode)."""
    from timm.models.vision_transformer import VisionTransformer

    m = VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                          num_classes=classes, mlp_ratio=mlp_ratio, qkv_bias=True, **kw)
    # timm initialises biases to 0: give every parameter some random value so that bias paths are exercised.
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return m.eval()


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
