"""The attention choices of an SPViT block (docs/method.md §1): one type for the whole package.

:class:`AttnChoice` is a ``str`` enum, so a member equals its plain string (``AttnChoice.MSA == "msa"``) and
architecture files keep the plain strings. Imports only the standard library.
"""
from enum import Enum


class AttnChoice(str, Enum):
    """What a block's attention layer became: kept MSA, a 3x3 or 1x1 convolution, or skipped."""

    MSA = "msa"
    CONV3 = "3x3"
    CONV1 = "1x1"
    SKIP = "skip"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def is_conv(self) -> bool:
        return self in CONV_CHOICES


# The members' plain strings, for code that torch.compile / torch.export trace (no enum objects in the graph's guards)
MSA, CONV3, CONV1, SKIP = (c.value for c in AttnChoice)
ATTN_CHOICES = tuple(c.value for c in AttnChoice)  # ("msa", "3x3", "1x1", "skip")
CONV_CHOICES = (AttnChoice.CONV3.value, AttnChoice.CONV1.value)
# A deployed block's kind: an attention choice, or "skip_ln" (the original fine-tune skip: the block adds LN1(x))
SKIP_LN = "skip_ln"
DEPLOY_KINDS = ATTN_CHOICES + (SKIP_LN,)

__all__ = ["AttnChoice", "MSA", "CONV3", "CONV1", "SKIP", "ATTN_CHOICES", "CONV_CHOICES", "SKIP_LN", "DEPLOY_KINDS"]
