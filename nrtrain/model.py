"""The NiT transformer over packed images (shared/reference/nit.md §4), in the manner of DiT's models.py.

A pack of images is one sequence of tokens [T, C*p*p]; attention is block-diagonal per image, 2D RoPE
gives each token its place, and adaLN-Zero conditions each image on its own timestep and class.
Conditioning is computed once per image ([B, D] → [B, 6D] per block) and gathered to tokens by
image id: NiT repeats it per token before the modulation Linear, which costs about half again the
model's useful FLOPs (shared/reference/perf.md §0).

Parameter names follow NiT's released checkpoints, so `load_nit_checkpoint` maps them one to one
except the patch embedding, which NiT stores as a Conv2d weight [D, C, p, p].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nrtrain.attention import AttentionMeta, compute_dtype, packed_attention, prepare_attention, resolve_backend
from nrtrain.packed import PackedBatch
from nrtrain.rope import ROPE_GRIDS, RopeExtrapolation, apply_rope, rope_coordinates, rope_cos_sin

MLP_KINDS = ("gelu", "swiglu")
TIMESTEP_FEATURES = 256


@dataclass(frozen=True)
class NiTConfig:
    in_channels: int
    patch_size: int
    hidden: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    mlp: str = "gelu"
    qk_norm: bool = True
    rope_grid: str = "rowcol"
    rope_theta: float = 10000.0
    repa_depth: int | None = None  # the REPA projector reads the output of this block (1-based)
    repa_dim: int | None = None  # width of the REPA encoder's features
    repa_hidden: int = 2048  # projector width (NiT-S uses 768)
    attention: str = "auto"

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be divisible by 4 for 2D RoPE")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"unknown mlp {self.mlp!r}; choose one of {MLP_KINDS}")
        if self.rope_grid not in ROPE_GRIDS:
            raise ValueError(f"unknown rope_grid {self.rope_grid!r}; choose one of {ROPE_GRIDS}")
        if self.repa_depth is not None:
            if not 1 <= self.repa_depth <= self.depth:
                raise ValueError(f"repa_depth {self.repa_depth} must lie in 1..depth ({self.depth})")
            if not self.repa_dim:
                raise ValueError("repa_depth needs repa_dim, the REPA encoder's feature width")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size ** 2

    @property
    def mlp_hidden(self) -> int:
        # SwiGLU keeps the parameter count of a GELU MLP by taking 2/3 of its width (FiTv2's choice)
        width = int(self.hidden * self.mlp_ratio)
        return width if self.mlp == "gelu" else 2 * width // 3


# depth / hidden / heads from NiT's configs (shared/reference/nit.md §4); tiny is for tests
PRESETS: dict[str, dict] = {
    "tiny": dict(depth=2, hidden=64, heads=4),
    "demo": dict(depth=4, hidden=256, heads=4),  # nr demo: minutes on a CPU
    "S": dict(depth=12, hidden=384, heads=6),
    "B": dict(depth=12, hidden=768, heads=12),
    "L": dict(depth=24, hidden=1024, heads=16),
    "XL": dict(depth=28, hidden=1152, heads=16),
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def xavier_linear(module: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def zero_linear(module: nn.Linear) -> nn.Linear:
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


#################################################################################
#                 Embeddings of tokens, timesteps and class labels              #
#################################################################################

class PatchEmbedder(nn.Module):
    """Linear C*p*p → D on patchified tokens; also loads a Conv2d weight [D, C, p, p], same numbers."""

    def __init__(self, token_dim: int, hidden: int):
        super().__init__()
        self.proj = xavier_linear(nn.Linear(token_dim, hidden))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "proj.weight"
        weight = state_dict.get(key)
        if weight is not None and weight.dim() == 4:
            state_dict[key] = weight.reshape(weight.shape[0], -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class TimestepEmbedder(nn.Module):
    """Raw t in [0, 1] → sinusoidal features [cos, sin] (dim 256, max period 10000) → MLP → D."""

    def __init__(self, hidden: int, features: int = TIMESTEP_FEATURES):
        super().__init__()
        self.features = features
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        for linear in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t, self.features).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class id → D; row `num_classes` is the null class. Label dropout belongs to the objective."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


#################################################################################
#                                 Transformer block                             #
#################################################################################

class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        head_dim = hidden // heads
        self.qkv = xavier_linear(nn.Linear(hidden, 3 * hidden))
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = xavier_linear(nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))  # [T, 3, H, Dh]
        q, k, v = qkv.unbind(1)
        # under autocast LayerNorm returns fp32; RoPE runs in fp32 and hands back qkv's dtype
        q = apply_rope(self.q_norm(q), cos, sin).to(v.dtype)
        k = apply_rope(self.k_norm(k), cos, sin).to(v.dtype)
        return self.proj(packed_attention(q, k, v, meta).flatten(1))


class GeluMLP(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.fc1 = xavier_linear(nn.Linear(hidden, width))
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = xavier_linear(nn.Linear(width, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUMLP(nn.Module):
    """fc2(silu(gate) * value) with gate and value from one fused fc1."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.fc1 = xavier_linear(nn.Linear(hidden, 2 * width))
        self.fc2 = xavier_linear(nn.Linear(width, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * value)


class NiTBlock(nn.Module):
    """adaLN-Zero block: modulation computed per image and gathered to its tokens.

    The modulation Linear starts at zero, so every block starts as the identity.
    """

    def __init__(self, config: NiTConfig):
        super().__init__()
        d = config.hidden
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, config.heads, config.qk_norm)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = (GeluMLP if config.mlp == "gelu" else SwiGLUMLP)(d, config.mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_linear(nn.Linear(d, 6 * d)))

    def forward(self, x: torch.Tensor, c: torch.Tensor, image_ids: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        per_token = self.adaLN_modulation(c)[image_ids]  # [B, 6D] computed, then gathered to [T, 6D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = per_token.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), cos, sin, meta)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, token_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = zero_linear(nn.Linear(hidden, token_dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_linear(nn.Linear(hidden, 2 * hidden)))

    def forward(self, x: torch.Tensor, c: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[image_ids].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def repa_projector(hidden: int, width: int, out: int) -> nn.Sequential:
    return nn.Sequential(xavier_linear(nn.Linear(hidden, width)), nn.SiLU(),
                         xavier_linear(nn.Linear(width, width)), nn.SiLU(),
                         xavier_linear(nn.Linear(width, out)))


#################################################################################
#                                    The model                                  #
#################################################################################

class NiT(nn.Module):
    def __init__(self, in_channels: int, patch_size: int, hidden: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 num_classes: int = 1000, mlp: str = "gelu", qk_norm: bool = True, rope_grid: str = "rowcol",
                 repa_depth: int | None = None, repa_dim: int | None = None, attention: str = "auto",
                 repa_hidden: int = 2048, rope_theta: float = 10000.0):
        super().__init__()
        config = NiTConfig(in_channels=in_channels, patch_size=patch_size, hidden=hidden, depth=depth, heads=heads,
                           mlp_ratio=mlp_ratio, num_classes=num_classes, mlp=mlp, qk_norm=qk_norm, rope_grid=rope_grid,
                           rope_theta=rope_theta, repa_depth=repa_depth, repa_dim=repa_dim, repa_hidden=repa_hidden,
                           attention=attention)
        self.config = config
        self.x_embedder = PatchEmbedder(config.token_dim, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(num_classes, hidden)
        self.blocks = nn.ModuleList([NiTBlock(config) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, config.token_dim)
        self.projector = repa_projector(hidden, repa_hidden, repa_dim) if repa_depth is not None else None
        self.attention_plan: tuple[str, str] | None = None  # (device type, backend) fixed by `use_attention`

    @classmethod
    def from_config(cls, config: NiTConfig) -> NiT:
        return cls(**asdict(config))

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def use_attention(self, device: torch.device | str, dtype: torch.dtype, *, training: bool,
                      compiled: bool = False) -> str:
        """Fix the attention backend for runs on `device` computing attention in `dtype` (the autocast
        dtype under autocast); returns it. Call before torch.compile, so that nothing is resolved
        inside the traced forward. Raises ValueError when the configured backend cannot run there."""
        device_type = torch.device(device).type
        backend = resolve_backend(self.config.attention, device_type, dtype, needs_backward=training,
                                  compiled=compiled)
        self.attention_plan = (device_type, backend)
        return backend

    def compile_blocks(self, **options) -> None:
        """torch.compile each transformer block (regional compilation: one graph serves every block
        and every pack length, with dynamic shapes). What lies between blocks (RoPE angles, the
        attention plan, embeddings) stays eager: it is cheap and depends on the pack's structure."""
        if self.attention_plan is None:
            raise ValueError("call use_attention(device, dtype, training=..., compiled=True) before compile_blocks")
        for block in self.blocks:
            block.compile(**{"dynamic": True, **options})

    def attention_backend(self, device: torch.device) -> str:
        """The backend `use_attention` fixed for this device type, else what nrtrain.attention's
        resolve_backend (the one place that decides) gives for the dtype this forward computes in."""
        plan = self.attention_plan
        if plan is not None and plan[0] == device.type:
            return plan[1]
        dtype = compute_dtype(device.type, self.x_embedder.proj.weight.dtype)
        return resolve_backend(self.config.attention, device.type, dtype,
                               needs_backward=self.training and torch.is_grad_enabled())

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, batch: PackedBatch, *,
                return_repa: bool = False, extrapolation: RopeExtrapolation | None = None):
        """Velocity for tokens x [T, C*p*p] of the images in `batch`, at times t [B] with labels y [B].

        Returns [T, C*p*p], or (that, REPA projection [T, repa_dim]) with return_repa.
        `extrapolation` stretches RoPE for images beyond the training size (sampling).
        """
        if return_repa and self.projector is None:
            raise ValueError("return_repa needs a model built with repa_depth and repa_dim")
        cfg = self.config
        meta = prepare_attention(batch, self.attention_backend(x.device))
        coords = rope_coordinates(batch.positions, batch.sizes, batch.image_ids, cfg.rope_grid)
        cos, sin = rope_cos_sin(coords, batch.sizes, batch.image_ids, cfg.head_dim, theta=cfg.rope_theta,
                                extrapolation=extrapolation)
        h = self.x_embedder(x)
        c = self.t_embedder(t) + self.y_embedder(y)  # [B, D]: one conditioning vector per image
        projected = None
        for depth, block in enumerate(self.blocks, start=1):
            h = block(h, c, batch.image_ids, cos, sin, meta)
            if return_repa and depth == cfg.repa_depth:
                projected = self.projector(h)
        out = self.final_layer(h, c, batch.image_ids)
        return (out, projected) if return_repa else out


def build_model(preset: str, in_channels: int, patch_size: int, **overrides) -> NiT:
    """A NiT of a named size (PRESETS) for latents of `in_channels` and a patch size; overrides win."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {list(PRESETS)}")
    return NiT(**{**PRESETS[preset], "in_channels": in_channels, "patch_size": patch_size, **overrides})


#################################################################################
#                           Loading NiT's released weights                      #
#################################################################################

CHECKPOINT_WRAPPERS = ("ema", "model", "state_dict")
KEY_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class CheckpointReport:
    loaded: list[str]  # model keys filled from the checkpoint
    converted: list[str]  # keys whose tensor was reshaped (the Conv2d patch embedding)
    ignored: list[str]  # checkpoint keys left unused on purpose (REPA projector when the model has none, ignore_extra)


def load_nit_checkpoint(model: NiT, source: dict | str | Path, *, check_rope_grid: bool = True,
                        ignore_extra: tuple[str, ...] = ()) -> CheckpointReport:
    """Load NiT's released weights (a state dict, or a .safetensors/.pt path) into `model`, strictly.

    Every model tensor must come from the checkpoint with the same shape; the keys allowed to be left
    over (reported as `ignored`) are the REPA projector when the model was built without one, and
    those starting with a prefix in `ignore_extra`, on request. Raises ValueError listing
    missing, unexpected and mis-shaped keys. NiT was trained with its own RoPE grid, so the model must
    be built with rope_grid="nit" unless check_rope_grid=False (e.g. to fine-tune into rowcol).
    """
    if check_rope_grid and model.config.rope_grid != "nit":
        raise ValueError(f"NiT checkpoints were trained with NiT's RoPE grid; build the model with "
                         f"rope_grid='nit' (it has {model.config.rope_grid!r})")
    state, origin = read_state_dict(source)
    expected = model.state_dict()
    converted, ignored, mismatched = [], [], []
    incoming = {}
    for key, tensor in state.items():
        if key not in expected:
            if (key.startswith("projector.") and model.projector is None) or (
                    ignore_extra and key.startswith(tuple(ignore_extra))):
                ignored.append(key)
                continue
            incoming[key] = tensor
            continue
        if key == "x_embedder.proj.weight" and tensor.dim() == 4:
            tensor = tensor.reshape(tensor.shape[0], -1)
            converted.append(key)
        if tensor.shape != expected[key].shape:
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[key].shape)}")
        incoming[key] = tensor
    missing = sorted(set(expected) - set(incoming))
    unexpected = sorted(set(incoming) - set(expected))
    if missing or unexpected or mismatched:
        problems = [f"missing from checkpoint: {missing}" if missing else "",
                    f"not in the model: {unexpected}" if unexpected else "",
                    f"shape mismatch: {mismatched}" if mismatched else ""]
        raise ValueError(f"{origin} does not fit the model ({describe(model.config)}): "
                         + "; ".join(p for p in problems if p)
                         + ". Check preset, in_channels, patch_size, num_classes, mlp and repa_depth/repa_dim.")
    model.load_state_dict(incoming, strict=True)
    return CheckpointReport(loaded=sorted(incoming), converted=converted, ignored=sorted(ignored))


def read_state_dict(source: dict | str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict with wrapper keys and DDP/compile prefixes removed, a name for messages)."""
    if isinstance(source, dict):
        state, origin = source, "checkpoint state dict"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        origin = str(path)
    for wrapper in CHECKPOINT_WRAPPERS:
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    cleaned = {}
    for key, tensor in state.items():
        for prefix in KEY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = tensor
    return cleaned, origin


def describe(config: NiTConfig) -> str:
    return (f"depth {config.depth}, hidden {config.hidden}, heads {config.heads}, in_channels {config.in_channels}, "
            f"patch {config.patch_size}, classes {config.num_classes}, mlp {config.mlp}")
