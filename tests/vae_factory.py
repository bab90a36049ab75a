"""Tiny random-weight VAEs with the real architectures, saved the way users have them on disk:
diffusers folders (DC-AE, SD-VAE) and LightningDiT-style LDM checkpoints (VA-VAE)."""

from __future__ import annotations

import sys
from pathlib import Path

import diffusers
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import ldm_reference  # noqa: E402

DCAE_CONFIG = {
    "in_channels": 3, "latent_channels": 32, "attention_head_dim": 8,
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_block_out_channels": [8, 16, 16, 32, 32, 32], "decoder_block_out_channels": [8, 16, 16, 32, 32, 32],
    "encoder_layers_per_block": [1] * 6, "decoder_layers_per_block": [1] * 6,
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]], "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "upsample_block_type": "interpolate", "downsample_block_type": "Conv",
    "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "scaling_factor": 0.41407,
}
KL_CONFIG = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
             "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "latent_channels": 4}
# VA-VAE's shape (5 levels, z 32, 2 resnets, attention at the lowest level) at tiny widths
TINY_VAVAE = {"ch": 32, "ch_mult": (1, 1, 2, 2, 2), "num_res_blocks": 2, "attn_resolutions": (2,),
              "resolution": 32, "z_channels": 32}

def _randomise(module):
    """Shift every parameter (norms included) so that a swapped key cannot go unnoticed."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval()



def write_tiny_vaes(root: Path):
    """dcae/ and kl/ diffusers folders, vavae.{pt,ckpt,safetensors}; returns the VA-VAE reference module."""
    torch.manual_seed(0)
    _randomise(diffusers.AutoencoderDC(**DCAE_CONFIG)).save_pretrained(root / "dcae")
    _randomise(diffusers.AutoencoderKL(**KL_CONFIG)).save_pretrained(root / "kl")
    reference = _randomise(ldm_reference.AutoencoderKL(**TINY_VAVAE))
    weights = reference.state_dict()
    # LightningDiT's layout: nested under state_dict, with training-only parts beside the autoencoder
    training_only = {"loss.logvar": torch.zeros(()), "linear_proj.weight": torch.zeros(8, 32, 1, 1),
                     "foundation_model.model.cls_token": torch.zeros(1, 1, 8)}
    torch.save({"state_dict": {**weights, **training_only}}, root / "vavae.pt")
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in weights.items()}, "epoch": 3},
               root / "vavae.ckpt")
    save_file({k: v.contiguous() for k, v in weights.items()}, root / "vavae.safetensors")
    return reference
