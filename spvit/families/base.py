"""The family protocol: what the pipeline needs to know about one kind of timm model.

A family is a :class:`Family` instance, ``FAMILY``, in its own module under ``spvit/families/`` (listed in
``spvit.families.FAMILY_MODULES``). The public entry points (``spvit.supernet``, ``spvit.prune``, ``spvit.deploy``,
``spvit.load_deployed``, ``spvit.load_official``, ``spvit.gflops``, the signature of a model) look the family up with
:func:`spvit.families.family_of` and call it; nothing registers itself at import time.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

from ..choices import AttnChoice


class Family:
    """One model family. Subclasses set the attributes and implement the methods.

    Attributes:
        name: the key written into files (``signature.family``, a deployed config's ``"family"``).
        display_name: for messages ("ViT/DeiT", "Swin").
        example_model: a timm model name of the family, for messages.
        timm_attr: the attribute under which the spvit models keep the wrapped timm model (``vit``, ``swin``): state
            dict keys carry it as a prefix.
        default_alpha: head-mixing temperature of the original code for this family (docs/method.md §1.2).
        signature_type: the :mod:`spvit.arch` signature class of the family.
        supernet_class / pruned_class / deployed_class: the model classes of search, fine-tune and inference.
        latency_pieces: name of the :mod:`spvit.latency` class that cuts a deployed model of the family into the
            pieces of its latency table (``ViTPieces``, ``SwinPieces``).
        attn_choices: the attention choices a block may take.
    """

    name: str = ""
    display_name: str = ""
    example_model: str = ""
    timm_attr: str = ""
    default_alpha: float = 1e-2
    signature_type: type = type(None)
    supernet_class: type = type(None)
    pruned_class: type = type(None)
    deployed_class: type = type(None)
    latency_pieces: str = ""
    attn_choices: Tuple[AttnChoice, ...] = tuple(AttnChoice)

    # -- recognising -------------------------------------------------------------------------------------------------
    def matches(self, model: Any) -> bool:
        """Is ``model`` (a timm model, or an spvit model of any phase) of this family?"""
        raise NotImplementedError

    def matches_name(self, name: str) -> bool:
        """Is ``name`` a timm model name (or a registered ``spvit_*`` name) of this family?"""
        raise NotImplementedError

    def signature_of(self, model: Any, check_blocks: bool = True):
        """The signature of a timm model of the family (or of an spvit model wrapping one).

        Raises:
            UnsupportedModelError: naming why the model cannot be converted.
        """
        raise NotImplementedError

    # -- the pipeline ------------------------------------------------------------------------------------------------
    def supernet(self, model: Any, theta: float, alpha: Optional[float], model_name: Optional[str]):
        """The search model (``spvit.supernet``; theta and alpha already checked, alpha None: the family's)."""
        raise NotImplementedError

    def prune(self, model: Any, arch, carry_weights: Optional[bool], alpha: Optional[float], official_skip: bool):
        """The fine-tune model of ``arch`` from a timm model or a supernet of the family (``spvit.prune``)."""
        raise NotImplementedError

    def deploy(self, model: Any, dtype, device):
        """The inference model of a pruned model of the family (``spvit.deploy``, before FFN padding)."""
        raise NotImplementedError

    # -- original checkpoints ----------------------------------------------------------------------------------------
    def claims_checkpoint(self, state_dict: Dict[str, Any]) -> bool:
        """Does an original state dict have this family's own layout (so that giving a model of another family is a
        mistake to name)? The default family answers False: its layout is the fallback."""
        return False

    def load_official(self, state_dict: Dict[str, Any], base: Any, name: str, path: str, alpha: Optional[float]):
        """The supernet or pruned model of an original checkpoint (``spvit.load_official``, file already read)."""
        raise NotImplementedError

    # -- FLOPs -------------------------------------------------------------------------------------------------------
    def macs(self, signature, attn_gates: Sequence, ffn_kept: Sequence):
        """MACs per image (a float, or a differentiable tensor) from per-block cumulative gates (e1, e3, em) and
        kept FFN units (docs/method.md §3.1)."""
        raise NotImplementedError

    def block_costs(self, signature, i: int) -> Tuple[int, int, int, int, int]:
        """Per-image MACs (c1, c3, cm, ffn_per_unit, norms) of block ``i``: the 1x1, 3x3 and MSA costs of its
        attention, one kept FFN unit, its two LayerNorms (docs/method.md §3.1)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<spvit family {self.name!r} ({self.display_name})>"


__all__ = ["Family"]
