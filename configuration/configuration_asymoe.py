"""AsyMoE configuration: a LLaVA-style vision-language model whose decoder FFNs become asymmetric MoE blocks.

This file is part of the Hub bundle: it imports only the standard library and transformers.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import transformers
from transformers import AutoConfig, PreTrainedConfig
from transformers.image_processing_utils import select_best_resolution
from transformers.utils import logging

# The transformers releases this code passed the version matrix on (docs/compatibility.md; `nox -s compatibility`
# writes this line). Checked when this file is imported (the first bundle file a checkpoint loads), so a checkpoint's
# code stops with a clear message instead of failing, or silently computing something else, under a release it was
# never run on.
TESTED_TRANSFORMERS = {"minimum": "5.17.0", "newest": "5.24.0"}


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as "5.24.0" or "5.25.0.dev0"."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"Cannot read the transformers version {version!r}.")
    return tuple(int(part or 0) for part in match.groups())


def check_transformers_version(tested: dict[str, str] = TESTED_TRANSFORMERS) -> None:
    """Raise `ImportError` under a transformers older than the tested minimum; warn under one newer than the newest
    tested release, once per process (transformers re-imports remote code on every load)."""
    installed = transformers.__version__
    if _release(installed) < _release(tested["minimum"]):
        raise ImportError(
            f"AsyMoE's code needs transformers >= {tested['minimum']} (tested on {tested['minimum']} to "
            f"{tested['newest']}), but transformers {installed} is installed: pip install -U "
            f"'transformers>={tested['minimum']}'"
        )
    if _release(installed) > _release(tested["newest"]):
        logging.get_logger("transformers").warning_once(
            f"AsyMoE's code was tested on transformers {tested['minimum']} to {tested['newest']}; transformers "
            f"{installed} is newer and untested. If results look wrong (generation, training), install "
            f"transformers=={tested['newest']} or a newer AsyMoE release."
        )


check_transformers_version()

MOE_VARIANTS = ("dense", "vanilla", "modality", "asymoe")
# Where the hyperbolic maps (and their gradients, learned through softplus in fp32) stay meaningful and finite.
CURVATURE_RANGE = (1e-6, 1e6)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

MANIFOLDS = ("poincare", "lorentz")

# Default expert counts per group for each variant: (vision-intra, text-intra, inter, evidence).
_VARIANT_DEFAULT_EXPERTS = {
    "dense": (0, 0, 0, 0),
    "vanilla": (0, 0, 4, 0),
    "modality": (2, 2, 0, 0),
    "asymoe": (1, 1, 2, 1),
}

# Hub bundle: the flat remote-code files and the classes each Auto class resolves to.
AUTO_MAP = {
    "AutoConfig": "configuration_asymoe.AsyMoEConfig",
    "AutoModel": "modeling_asymoe.AsyMoEForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_asymoe.AsyMoEForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_asymoe.AsyMoEForConditionalGeneration",
    "AutoProcessor": "processing_asymoe.AsyMoEProcessor",
}


@dataclass(frozen=True)
class ExpertLayout:
    """Where each expert group sits in one MoE layer's fused expert tensors (order: vision, text, inter, evidence)."""

    num_vision: int
    num_text: int
    num_inter: int
    num_evidence: int

    @property
    def num_experts(self) -> int:
        return self.num_vision + self.num_text + self.num_inter + self.num_evidence

    def group_slices(self) -> dict[str, slice]:
        """Expert-index ranges of the non-empty groups, in storage order."""
        slices, start = {}, 0
        for name, count in (
            ("vision", self.num_vision),
            ("text", self.num_text),
            ("inter", self.num_inter),
            ("evidence", self.num_evidence),
        ):
            if count:
                slices[name] = slice(start, start + count)
            start += count
        return slices

    def reachable(self, modality: str) -> tuple[int, ...]:
        """The experts tokens of `modality` may route to: image tokens the vision and inter experts, text tokens the
        text, inter and evidence experts (the one definition the router, its losses and statistics use)."""
        groups = {"image": ("vision", "inter"), "text": ("text", "inter", "evidence")}[modality]
        spans = [span for name, span in self.group_slices().items() if name in groups]
        return tuple(expert for span in spans for expert in range(span.start, span.stop))


class AsyMoETextConfig(PreTrainedConfig):
    r"""Configuration of the AsyMoE decoder: a Llama-family transformer whose FFNs in `moe_layers` are MoE blocks.

    Architecture flags cover Llama/Vicuna (defaults), Mistral (`sliding_window`), Qwen2/2.5 (`qkv_bias=True`),
    Qwen3 (`use_qk_norm=True`, `head_dim`) and tied embeddings. RoPE scaling goes through `rope_parameters`
    (transformers' rope utilities).

    MoE fields:
        moe_variant (`str`): `"dense"` (no MoE), `"vanilla"` (one expert pool shared by all tokens), `"modality"`
            (vision experts for image tokens, text experts for text tokens) or `"asymoe"` (intra-modality,
            hyperbolic inter-modality and evidence-priority language experts).
        moe_layers (`list[int]`, *optional*): decoder layers whose FFN is an MoE block; default every other layer
            (1, 3, 5, ...). Ignored (empty) for `"dense"`.
        evidence_layers (`list[int]`, *optional*): MoE layers that hold evidence-priority experts; default the MoE
            layers in the deeper half of the stack.
        num_vision_experts / num_text_experts / num_inter_experts / num_evidence_experts (`int`, *optional*):
            experts per group; `None` takes the variant's default.
        num_experts_per_tok (`int`): experts each token activates (top-k over its reachable experts).
        moe_intermediate_size (`int`, *optional*): expert FFN width; default `intermediate_size`.
        hyperbolic_inter (`bool`, *optional*): Möbius (hyperbolic) inter-modality experts; `False` makes them
            Euclidean. Default `True` for `"asymoe"`; only valid there.
        evidence_experts (`bool`, *optional*): evidence-priority experts on/off. Default `True` for `"asymoe"`.
        manifold (`str`): `"poincare"` or `"lorentz"`.
        curvature (`float`): initial curvature c of the manifold (learned as softplus(ĉ) if `learn_curvature`).
        hyperbolic_scale (`float`, *optional*): initial tangent scale s of each Möbius map; default √(map width).
        mobius_residual (`bool`): use the residual form of the Möbius bias (exactly Euclidean at zero bias, keeps
            magnitudes beyond the clamp radius; see `hyperbolic_asymoe.mobius_bias`); `False` = textbook map.
        router_bias_update_rate (`float`): auxiliary-loss-free load balancing (DeepSeek-V3): experts are selected by
            router logit + a per-modality bias, and after every optimizer step each bias moves by this rate towards
            balance (up for experts below their modality's mean load, down above it). No loss term, so any trainer
            (TRL's included) trains it as is. `0` turns it off.
        output_router_logits (`bool`): return router logits (and `aux_loss`, `z_loss`) from the forward.
        router_aux_loss_coef (`float`): weight of the per-modality Switch load-balancing loss that the model's own
            forward adds to its loss (with `output_router_logits`); default 0: balancing is loss-free.
        router_z_loss_coef (`float`): weight of the router z-loss (idem).
        experts_gather_max_tokens (`int`): calls of the default `grouped_mm` experts with at most this many tokens
            (decoding steps) skip the sort and grouped GEMM: inside compiled graphs they gather each token's expert
            weights (`batched_mm`), eager inference runs each (token, expert) pair through its expert's weights.
            `0` turns both off.
    """

    model_type = "asymoe_text"
    base_config_key = "text_config"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = False,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        qkv_bias: bool = False,
        use_qk_norm: bool = False,
        sliding_window: int | None = None,
        attention_dropout: float = 0.0,
        moe_variant: str = "asymoe",
        moe_layers: list[int] | None = None,
        evidence_layers: list[int] | None = None,
        num_vision_experts: int | None = None,
        num_text_experts: int | None = None,
        num_inter_experts: int | None = None,
        num_evidence_experts: int | None = None,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int | None = None,
        hyperbolic_inter: bool | None = None,
        evidence_experts: bool | None = None,
        manifold: str = "poincare",
        curvature: float = 1.0,
        learn_curvature: bool = True,
        hyperbolic_scale: float | None = None,
        mobius_residual: bool = True,
        router_bias_update_rate: float = 1e-3,
        output_router_logits: bool = False,
        router_aux_loss_coef: float = 0.0,
        router_z_loss_coef: float = 0.0,
        experts_gather_max_tokens: int = 4,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_parameters = rope_parameters
        self.attention_bias = attention_bias
        self.qkv_bias = qkv_bias
        self.use_qk_norm = use_qk_norm
        self.sliding_window = sliding_window
        self.attention_dropout = attention_dropout

        if moe_variant not in MOE_VARIANTS:
            raise ValueError(f"moe_variant={moe_variant!r} is not one of {MOE_VARIANTS}.")
        self.moe_variant = moe_variant
        is_asymoe = moe_variant == "asymoe"
        for name, value in (("hyperbolic_inter", hyperbolic_inter), ("evidence_experts", evidence_experts)):
            if value and not is_asymoe:
                raise ValueError(
                    f"{name}=True needs moe_variant='asymoe' (got {moe_variant!r}); it is an AsyMoE expert group."
                )
        self.hyperbolic_inter = is_asymoe if hyperbolic_inter is None else hyperbolic_inter
        self.evidence_experts = is_asymoe if evidence_experts is None else evidence_experts

        defaults = _VARIANT_DEFAULT_EXPERTS[moe_variant]
        given = (num_vision_experts, num_text_experts, num_inter_experts, num_evidence_experts)
        counts = [d if g is None else g for d, g in zip(defaults, given)]
        if not self.evidence_experts:
            counts[3] = 0 if num_evidence_experts is None else counts[3]
        (self.num_vision_experts, self.num_text_experts, self.num_inter_experts, self.num_evidence_experts) = counts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size if moe_intermediate_size is not None else intermediate_size

        if moe_variant == "dense":
            self.moe_layers = []
        elif moe_layers is None:
            self.moe_layers = list(range(1, num_hidden_layers, 2))
        else:
            self.moe_layers = sorted(int(i) for i in moe_layers)
        if not self.evidence_experts:
            self.evidence_layers = []
        elif evidence_layers is None:
            self.evidence_layers = [i for i in self.moe_layers if i >= num_hidden_layers // 2]
        else:
            self.evidence_layers = sorted(int(i) for i in evidence_layers)

        self.manifold = manifold
        self.curvature = curvature
        self.learn_curvature = learn_curvature
        self.hyperbolic_scale = hyperbolic_scale
        self.mobius_residual = mobius_residual
        self.router_bias_update_rate = router_bias_update_rate
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.experts_gather_max_tokens = experts_gather_max_tokens

        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        self.validate_moe()

    def validate_moe(self) -> None:
        """Raise a `ValueError` that names the fix for any inconsistent MoE setting."""
        layers = range(self.num_hidden_layers)
        bad = [i for i in self.moe_layers if i not in layers]
        if bad:
            raise ValueError(f"moe_layers {bad} are outside the decoder's layers 0..{self.num_hidden_layers - 1}.")
        bad = [i for i in self.evidence_layers if i not in self.moe_layers]
        if bad:
            raise ValueError(f"evidence_layers {bad} are not MoE layers; choose them from moe_layers={self.moe_layers}.")
        if self.manifold not in MANIFOLDS:
            raise ValueError(f"manifold={self.manifold!r} is not one of {MANIFOLDS}.")
        low, high = CURVATURE_RANGE
        if not _is_number(self.curvature) or not low <= self.curvature <= high:
            raise ValueError(
                f"curvature must be a number in [{low:g}, {high:g}] (got {self.curvature!r}): below it the Möbius "
                "maps are Euclidean to fp32 precision (set hyperbolic_inter=False for Euclidean inter experts), "
                "above it they saturate."
            )
        scale = self.hyperbolic_scale
        if scale is not None and not (_is_number(scale) and scale > 0):
            raise ValueError(
                f"hyperbolic_scale must be a finite number > 0 (got {self.hyperbolic_scale!r}); None takes sqrt(map "
                "width)."
            )
        for name in ("num_experts_per_tok", "moe_intermediate_size", "num_vision_experts", "num_text_experts",
                     "num_inter_experts", "num_evidence_experts", "experts_gather_max_tokens"):
            value = getattr(self, name)
            minimum = 0 if name.endswith("_experts") or name == "experts_gather_max_tokens" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum} (got {value!r}).")
        if not _is_number(self.router_bias_update_rate) or self.router_bias_update_rate < 0:
            raise ValueError(
                f"router_bias_update_rate must be a finite number >= 0 (got {self.router_bias_update_rate!r}); 0 "
                "turns the loss-free balancing off."
            )
        variant = self.moe_variant
        if variant == "vanilla" and (self.num_vision_experts or self.num_text_experts or self.num_evidence_experts):
            raise ValueError(
                "moe_variant='vanilla' has one shared expert pool: set num_inter_experts and leave the vision, text "
                "and evidence groups at 0 (use moe_variant='modality' or 'asymoe' for modality groups)."
            )
        if variant == "modality" and (self.num_inter_experts or self.num_evidence_experts):
            raise ValueError(
                "moe_variant='modality' has only vision and text experts: set num_inter_experts=0 and "
                "num_evidence_experts=0 (use moe_variant='asymoe' for inter-modality and evidence experts)."
            )
        if self.evidence_experts and self.evidence_layers and self.num_evidence_experts < 1:
            raise ValueError("evidence_experts=True needs num_evidence_experts >= 1 (or set evidence_experts=False).")
        if self.hyperbolic_inter and self.num_inter_experts < 1:
            raise ValueError("hyperbolic_inter=True needs num_inter_experts >= 1 (or set hyperbolic_inter=False).")
        k = self.num_experts_per_tok
        for layer in self.moe_layers:
            layout = self.expert_layout(layer)
            for modality in ("image", "text"):
                reachable = len(layout.reachable(modality))
                if reachable < k:
                    raise ValueError(
                        f"num_experts_per_tok={k} is larger than the {reachable} experts {modality} tokens can reach "
                        f"in MoE layer {layer} ({layout}); lower num_experts_per_tok or add experts to the groups "
                        f"{modality} tokens reach."
                    )

    @property
    def num_experts(self):
        """Not defined: AsyMoE's layers differ in expert count, and each modality reaches only its own groups.

        Trainers that read it (TRL, when its `router_aux_loss_coef` is non-zero) would add Mixtral's load-balancing
        loss over all experts of a layer, blind to the modality masks; AsyMoE balances without a loss instead."""
        raise AttributeError(
            "AsyMoE has no single `num_experts`: layers differ in expert count and each modality reaches only its "
            "own expert groups, so a trainer-side Mixtral load-balancing loss would be wrong for it (TRL computes "
            "one when its `router_aux_loss_coef` is non-zero, and DPO whenever the model config has "
            "`output_router_logits=True`). AsyMoE balances experts without a loss (`router_bias_update_rate`): keep "
            "`router_aux_loss_coef` at 0 in the trainer's config and `output_router_logits` False in the model's "
            "(the defaults). The per-modality Switch loss is the model's own: set `router_aux_loss_coef` in the model "
            "config and train on the model's loss (`model(..., labels=..., output_router_logits=True)`)."
        )

    def expert_layout(self, layer_idx: int) -> ExpertLayout | None:
        """The expert groups of decoder layer `layer_idx`, or `None` if its FFN is dense."""
        if layer_idx not in self.moe_layers:
            return None
        return ExpertLayout(
            num_vision=self.num_vision_experts,
            num_text=self.num_text_experts,
            num_inter=self.num_inter_experts,
            num_evidence=self.num_evidence_experts if layer_idx in self.evidence_layers else 0,
        )


class AsyMoEConfig(PreTrainedConfig):
    r"""Configuration of [`AsyMoEForConditionalGeneration`]: vision tower + LLaVA projector + AsyMoE decoder.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*): any transformers vision-model config (CLIP,
            SigLIP, ...); default a CLIP ViT-L/14-336 vision tower.
        text_config (`dict` or [`AsyMoETextConfig`], *optional*): the decoder and its MoE settings.
        image_token_id (`int`): id of the `<image>` placeholder token.
        projector_hidden_act (`str`): activation of the two-layer projector.
        vision_feature_select_strategy (`str`): `"default"` drops the vision tower's CLS token, `"full"` keeps all.
        vision_feature_layer (`int` or `list[int]`): hidden-state layer(s) of the vision tower fed to the projector.
        multimodal_projector_bias (`bool`): projector linear layers have biases.
        image_grid_pinpoints (`list[list[int]]`, *optional*): LLaVA-NeXT / OneVision "anyres" resolutions
            `[height, width]` (multiples of the vision tower's image size). When set, an image is a base tile plus the
            tiles of its best-fitting resolution; tile features are unpadded to the image's aspect ratio and each row
            ends with a learned `image_newline`. `None` (default): plain LLaVA, one fixed-size tile per image.
        vision_aspect_ratio (`str`, *optional*): OneVision's `"anyres_max_N"`: tile features larger than about N
            tiles are bilinearly pooled down to N tiles' worth. `None`: no pooling (LLaVA-NeXT).
        upcycling (`dict`, *optional*): manifest written when the model was upcycled from a dense checkpoint.

    `config.json` also records `tested_transformers`, the transformers releases the code saved with it was tested on
    (always this code's own range: a value read from an older file is replaced).
    """

    model_type = "asymoe"
    sub_configs = {"text_config": AsyMoETextConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict | PreTrainedConfig | None = None,
        text_config: dict | AsyMoETextConfig | None = None,
        image_token_id: int = 32000,
        projector_hidden_act: str = "gelu",
        vision_feature_select_strategy: str = "default",
        vision_feature_layer: int | list[int] = -2,
        multimodal_projector_bias: bool = True,
        image_grid_pinpoints: list[list[int]] | None = None,
        vision_aspect_ratio: str | None = None,
        upcycling: dict | None = None,
        tie_word_embeddings: bool | None = None,
        **kwargs,
    ):
        kwargs.pop("tested_transformers", None)
        self.tested_transformers = dict(TESTED_TRANSFORMERS)
        if isinstance(vision_config, dict):
            vision_config = dict(vision_config)
            model_type = vision_config.pop("model_type", "clip_vision_model")
            vision_config = AutoConfig.for_model(model_type, **vision_config)
        elif vision_config is None:
            vision_config = AutoConfig.for_model(
                "clip_vision_model",
                hidden_size=1024,
                intermediate_size=4096,
                patch_size=14,
                image_size=336,
                num_hidden_layers=24,
                num_attention_heads=16,
                projection_dim=768,
            )
        if isinstance(text_config, dict):
            text_config = AsyMoETextConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
        elif text_config is None:
            text_config = AsyMoETextConfig()
        if vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy={vision_feature_select_strategy!r} must be 'default' (drop the CLS "
                "token) or 'full'."
            )
        pinpoints = None if image_grid_pinpoints is None else [[int(h), int(w)] for h, w in image_grid_pinpoints]
        if pinpoints is not None:
            tile = vision_config.image_size
            if not pinpoints or any(h <= 0 or w <= 0 or h % tile or w % tile for h, w in pinpoints):
                raise ValueError(
                    f"image_grid_pinpoints={pinpoints} must be a non-empty list of [height, width] pairs, "
                    f"each a positive multiple of the vision tower's image_size {tile}."
                )
        if vision_aspect_ratio is not None:
            if pinpoints is None:
                raise ValueError("vision_aspect_ratio only applies to anyres models: set image_grid_pinpoints too.")
            if not re.fullmatch(r"anyres_max_[1-9]\d*", vision_aspect_ratio):
                raise ValueError(
                    f"vision_aspect_ratio={vision_aspect_ratio!r} must look like 'anyres_max_9' (at most 9 tiles of "
                    "features per image)."
                )
        self.vision_config = vision_config
        self.text_config = text_config
        self.image_token_id = image_token_id
        self.projector_hidden_act = projector_hidden_act
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vision_feature_layer = vision_feature_layer
        self.multimodal_projector_bias = multimodal_projector_bias
        self.image_grid_pinpoints = pinpoints
        self.vision_aspect_ratio = vision_aspect_ratio
        self.upcycling = upcycling
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        if tie_word_embeddings is None:
            tie_word_embeddings = text_config.tie_word_embeddings
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def max_anyres_tiles(self) -> int | None:
        """OneVision's feature budget in tiles (`vision_aspect_ratio="anyres_max_N"` -> N); `None` without pooling."""
        return int(self.vision_aspect_ratio.rsplit("_", 1)[1]) if self.vision_aspect_ratio else None

    @property
    def num_image_tokens(self) -> int:
        """Image features one image contributes (= `<image>` placeholders after expansion); for anyres models, the
        features of one tile (the base tile of every image)."""
        vision = self.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        has_cls = vision.model_type in ("clip_vision_model", "clip")
        # Same count as transformers' LLaVA: "default" drops the first token whether or not it is a CLS token.
        return patches + int(has_cls) - int(self.vision_feature_select_strategy == "default")

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save `config.json` plus the flat remote-code file that `trust_remote_code=True` loads."""
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory, __file__)


@dataclass(frozen=True)
class AnyresLayout:
    """Feature geometry of one LLaVA-NeXT / OneVision "anyres" image (the tiles after its base tile)."""

    tiles: tuple[int, int]  # tile rows and columns of the best-fitting pinpoint resolution
    unpadded: tuple[int, int]  # feature rows and columns left once the letterbox padding is cut away
    pooled: tuple[int, int] | None  # OneVision: rows and columns after bilinear pooling; None when not pooled

    @property
    def num_tiles(self) -> int:
        """Tiles the image processor emits for the image: the grid plus the base tile."""
        return self.tiles[0] * self.tiles[1] + 1

    @property
    def num_grid_features(self) -> int:
        """Features of the tile grid: every row of the (pooled) grid plus one `image_newline`."""
        rows, cols = self.pooled or self.unpadded
        return rows * (cols + 1)


def anyres_layout(
    image_size, grid_pinpoints: list[list[int]], tile_size: int, patches_per_side: int, max_tiles: int | None = None
) -> AnyresLayout:
    """The anyres geometry of an image of `image_size` (height, width), as LLaVA-NeXT / OneVision compute it.

    The image is resized into the best-fitting pinpoint resolution (aspect ratio kept, letterboxed) and cut into
    `tile_size` tiles of `patches_per_side`² features; the features of the letterbox bars are dropped. With
    `max_tiles` (OneVision), a grid larger than about `max_tiles` tiles (ratio > 1.1) is pooled down to that size.
    """
    height, width = (int(v) for v in image_size)
    best_height, best_width = select_best_resolution((height, width), grid_pinpoints)
    rows, cols = best_height // tile_size, best_width // tile_size
    grid_height, grid_width = rows * patches_per_side, cols * patches_per_side
    if width / height > grid_width / grid_height:
        kept = int(round(height * (grid_width / width), 7))
        grid_height -= 2 * ((grid_height - kept) // 2)
    else:
        kept = int(round(width * (grid_height / height), 7))
        grid_width -= 2 * ((grid_width - kept) // 2)
    pooled = None
    if max_tiles is not None:
        ratio = math.sqrt(grid_height * grid_width / (max_tiles * patches_per_side**2))
        if ratio > 1.1:
            pooled = (int(grid_height // ratio), int(grid_width // ratio))
    return AnyresLayout((rows, cols), (grid_height, grid_width), pooled)


def write_remote_code(save_directory: str | os.PathLike, module_file: str) -> list[Path]:
    """Write `module_file` and, recursively, the project files it imports as flat remote-code siblings.

    Inside the project, bundle files import each other as `from ..package.module_name import X`; the Hub loader only
    follows `from .module_name import X`, so those imports are rewritten. Files are written atomically.
    """
    written, pending, seen = [], [Path(module_file)], set()
    while pending:
        source = pending.pop()
        if source.name in seen:
            continue
        seen.add(source.name)
        text = source.read_text(encoding="utf-8")
        flat = re.sub(r"^(\s*)from \.\.?(?:\w+\.)?(\w+) import", r"\1from .\2 import", text, flags=re.MULTILINE)
        for imported in re.findall(r"^\s*from \.(\w+) import", flat, flags=re.MULTILINE):
            pending.append(_find_sibling(source, imported, text))
        written.append(write_text_atomically(Path(save_directory) / source.name, flat))
    return written


def write_text_atomically(path: Path, text: str) -> Path:
    """Write `text` to a temporary sibling of `path` (named `.<name>.partial-<pid>-<random>`), then rename it onto
    `path`. A plain `open`, not mkstemp's owner-only 0600: the file gets the modes save_pretrained's files get."""
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, "x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _find_sibling(source: Path, module_name: str, text: str) -> Path:
    """Locate the file of `module_name` imported by `source`: a flat sibling, or a sibling package's module."""
    match = re.search(rf"^\s*from \.\.(\w+)\.{module_name} import", text, flags=re.MULTILINE)
    if match and __package__ and "." in __package__:
        package = importlib.import_module(f"{__package__.rsplit('.', 1)[0]}.{match.group(1)}")
        return Path(package.__file__).parent / f"{module_name}.py"
    return source.parent / f"{module_name}.py"


__all__ = [
    "AnyresLayout",
    "AsyMoEConfig",
    "AsyMoETextConfig",
    "ExpertLayout",
    "TESTED_TRANSFORMERS",
    "anyres_layout",
    "check_transformers_version",
    "write_remote_code",
    "write_text_atomically",
]
