"""REPA: frozen encoders loaded from TorchScript or a local hub repo, targets in pack token order, loader
pixels that are exactly the pixels of the latents they ride with, and training with the alignment term."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from nrdata.catalog import Catalog, CatalogWriter
from nrdata.encoders import PixelEncoder
from nrdata.encoding import catalog_manifest, encode_locally
from nrdata.images import ImageDecodeError
from nrdata.packing.catalog_packs import pack_catalogs, write_pack_result
from nrdata.policies import parse_policy
from nrdata.sources import list_image_folder
from nrtrain.checkpoint import STEP_PREFIX, load_model, read_run_info
from nrtrain.loader import PackedDataset, PackedLoader
from nrtrain.model import build_model
from nrtrain.packed import packed_from_tokens, unpatchify
from nrtrain.repa import NORMALIZATIONS, load_vision_encoder, repa_targets
from nrtrain.train import TrainConfig, train
from nrtrain.transport import FlowMatchingLoss

FACTOR = 4  # pixel encoder: 4x4 pixels per latent pixel, 48 channels
ENCODER_PATCH = 4


class TinyViT(torch.nn.Module):
    """Conv patch embedding, a cls token in front, one transformer layer: [N, 1 + h*w, dim]."""

    def __init__(self, patch_size: int = ENCODER_PATCH, dim: int = 16) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_prefix_tokens = 1
        self.embed = torch.nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.layer = torch.nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.layer(torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1))


class PatchMean(torch.nn.Module):
    """Each patch's mean colour as a feature map [N, 3, h, w]: shows where every token came from."""

    def __init__(self, patch_size: int = ENCODER_PATCH) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.patch_size)


def save_scripted(module: torch.nn.Module, path: Path) -> str:
    torch.manual_seed(0)
    torch.jit.script(module).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory) -> str:
    torch.manual_seed(0)
    return save_scripted(TinyViT(), tmp_path_factory.mktemp("enc") / "tiny_vit.pt")


def write_images(root: Path, count: int = 14, seed: int = 0) -> Path:
    """Smooth random RGB images of assorted sizes (not multiples of the factor) in two class folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = int(rng.integers(14, 42)), int(rng.integers(14, 42))
        yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        coef = rng.uniform(0, 255, (3, 3))
        pixels = np.stack([coef[c, 0] * yy + coef[c, 1] * xx + coef[c, 2] * yy * xx for c in range(3)], -1)
        pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def pixel_data(tmp_path_factory):
    """A pixel-encoder catalog with a native and a centre-crop variant and stored flipped twins, and its packs."""
    root = tmp_path_factory.mktemp("pixel")
    images = write_images(root / "images")
    encoder = PixelEncoder(factor=FACTOR)
    policies = [parse_policy("native", unit=FACTOR), parse_policy("center-crop:16", unit=FACTOR)]
    manifest = catalog_manifest(encoder, policies, flip=True, source_root=str(images))
    with CatalogWriter(root / "cat", manifest) as writer:
        encode_locally(list_image_folder(images), writer, encoder, policies, flip=True)
    write_pack_result(root / "packs.parquet", pack_catalogs([root / "cat"], max_tokens=160, epochs=3, seed=1))
    return root


# -- the encoder ----------------------------------------------------------------------------------

def test_torchscript_encoder_is_frozen_and_drops_the_prefix_token(vit_file):
    encoder = load_vision_encoder(vit_file, normalization="clip")
    assert (encoder.patch_size, encoder.dim, encoder.prefix_tokens) == (ENCODER_PATCH, 16, 1)
    assert not encoder.module.training
    assert not any(p.requires_grad for p in encoder.module.parameters())
    images = torch.rand(2, 3, 8, 12)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS["clip"])
    reference = torch.jit.load(vit_file)((images - mean) / std)[:, 1:]
    features = encoder.features(images)
    assert features.shape == (2, 6, 16)
    torch.testing.assert_close(features, reference)


def test_feature_maps_become_row_major_tokens(tmp_path):
    encoder = load_vision_encoder(save_scripted(PatchMean(), tmp_path / "mean.pt"), normalization="none")
    assert encoder.dim == 3
    image = torch.zeros(1, 3, 3 * ENCODER_PATCH, 5 * ENCODER_PATCH)
    image[0, 1, ENCODER_PATCH: 2 * ENCODER_PATCH, 3 * ENCODER_PATCH: 4 * ENCODER_PATCH] = 1.0  # patch (1, 3)
    features = encoder.features(image)[0]
    assert features.shape == (15, 3)
    assert torch.nonzero(features[:, 1]).flatten().tolist() == [1 * 5 + 3]


def test_targets_are_in_pack_order_with_one_encoder_call_per_size(vit_file):
    encoder = load_vision_encoder(vit_file)
    rng = np.random.default_rng(3)
    # token sizes interleaved so that grouping by size reorders the images; pixel sizes vary within a size
    shapes = [((2, 3), (64, 96)), ((3, 2), (12, 8)), ((2, 3), (8, 12)), ((1, 1), (4, 4)), ((2, 3), (64, 96))]
    images = [rng.integers(0, 256, (*px, 3), dtype=np.uint8) for _, px in shapes]
    sizes = [tok for tok, _ in shapes]
    batch = packed_from_tokens([torch.zeros(h * w, 1) for h, w in sizes], sizes, [0] * len(sizes))

    calls = []
    features = encoder.features
    encoder.features = lambda x: calls.append(tuple(x.shape)) or features(x)
    targets = repa_targets(encoder, images, batch.sizes, "cpu")
    assert targets.shape == (batch.num_tokens, encoder.dim) and targets.dtype == torch.float32
    assert sorted(calls) == sorted([(3, 3, 8, 12), (1, 3, 12, 8), (1, 3, 4, 4)])

    for i, ((h, w), pixels) in enumerate(zip(sizes, images)):
        one = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
        if one.shape[2:] != (h * ENCODER_PATCH, w * ENCODER_PATCH):
            one = F.interpolate(one, size=(h * ENCODER_PATCH, w * ENCODER_PATCH), mode="bicubic", antialias=True,
                                align_corners=False).clamp(0, 1)
        start, end = int(batch.cu_seqlens[i]), int(batch.cu_seqlens[i + 1])
        torch.testing.assert_close(targets[start:end], features(one)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="build the loader with repa_images"):
        repa_targets(encoder, images[:2], batch.sizes, "cpu")


def test_a_local_hub_entry_loads_without_network(tmp_path):
    repo = tmp_path / "hubrepo"
    repo.mkdir()
    (repo / "hubconf.py").write_text(textwrap.dedent("""
        import torch

        dependencies = ["torch"]

        class PatchEmbed(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.patch_size = (4, 4)
                self.proj = torch.nn.Conv2d(3, 8, 4, 4)

        class DinoLike(torch.nn.Module):
            # DINOv2's forward_features: a dict, one cls and two register tokens kept apart
            def __init__(self):
                super().__init__()
                self.patch_embed = PatchEmbed()

            def forward_features(self, x):
                tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
                return {"x_norm_clstoken": tokens.mean(1), "x_norm_patchtokens": tokens}

            def forward(self, x):
                return self.forward_features(x)["x_norm_clstoken"]

        def tiny_dino():
            torch.manual_seed(0)
            return DinoLike()
    """))
    encoder = load_vision_encoder(f"hub:{repo}:tiny_dino")
    assert (encoder.patch_size, encoder.dim) == (4, 8)
    assert encoder.features(torch.rand(3, 3, 12, 8)).shape == (3, 6, 8)
    with pytest.raises(ValueError, match="failed"):
        load_vision_encoder(f"hub:{repo}:no_such_entry")


class NoPatchSize(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class WrongTokens(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_size = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # one token per pixel, not per patch


def test_bad_encoder_specs_say_what_to_do(tmp_path, vit_file):
    with pytest.raises(FileNotFoundError, match="no such file.*TorchScript"):
        load_vision_encoder(str(tmp_path / "missing.pt"))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state_dict.pt")
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        load_vision_encoder(str(tmp_path / "state_dict.pt"))
    with pytest.raises(ValueError, match="hub:<local repo dir>:<entry>"):
        load_vision_encoder("hub:just-a-name")
    with pytest.raises(FileNotFoundError, match="no hubconf.py"):
        load_vision_encoder(f"hub:{tmp_path}:entry")
    with pytest.raises(ValueError, match="patch_size"):
        load_vision_encoder(save_scripted(NoPatchSize(), tmp_path / "nops.pt"))
    with pytest.raises(ValueError, match=r"expected \[N, 0 prefix \+ 4 patch tokens"):
        load_vision_encoder(save_scripted(WrongTokens(), tmp_path / "wrong.pt"))
    with pytest.raises(ValueError, match="normalization"):
        load_vision_encoder(vit_file, normalization="imagenet21k")


# -- the loader's images ----------------------------------------------------------------------------

def decoded_images(batch, dataset: PackedDataset) -> list[np.ndarray]:
    """What PixelEncoder.decode makes of the batch's own (normalised) latent tokens."""
    mean = torch.tensor(dataset.normalization.mean, dtype=torch.float64)
    std = torch.tensor(dataset.normalization.std, dtype=torch.float64)
    out = []
    for i, (h, w) in enumerate(batch.sizes.tolist()):
        tokens = batch.tokens[int(batch.cu_seqlens[i]): int(batch.cu_seqlens[i + 1])].double() * std + mean
        latent = unpatchify(tokens, h, w, dataset.channels, dataset.patch_size).round().to(torch.uint8).numpy()
        out.append(PixelEncoder(factor=FACTOR).decode(latent[None])[0])
    return out


def test_loader_images_are_the_pixels_of_its_latents(pixel_data):
    dataset = PackedDataset(pixel_data / "packs.parquet", repa_images="source", seed=5)
    plain = PackedDataset(pixel_data / "packs.parquet", seed=5)
    cat = Catalog(pixel_data / "cat")
    flipped = unflipped = 0
    for position in range(dataset.num_steps):
        batch = dataset.batch(position)
        assert plain.batch(position).images is None
        torch.testing.assert_close(batch.tokens, plain.batch(position).tokens)
        assert len(batch.images) == batch.num_images
        for row, image, decoded in zip(batch.row_ids.tolist(), batch.images, decoded_images(batch, dataset)):
            assert image.dtype == np.uint8 and image.shape == decoded.shape
            np.testing.assert_array_equal(image, decoded)
            stored = PixelEncoder(factor=FACTOR).decode(cat.latent(row)[None])[0]
            if np.array_equal(image, stored):
                unflipped += 1
            else:
                np.testing.assert_array_equal(image, stored[:, ::-1])
                flipped += 1
    assert flipped > 5 and unflipped > 5


def test_workers_and_a_moved_image_folder_give_the_same_images(pixel_data, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(pixel_data / "images", moved)
    direct = PackedDataset(pixel_data / "packs.parquet", repa_images="source", seed=2)
    loader = PackedLoader(pixel_data / "packs.parquet", repa_images="source", image_root=moved, seed=2, num_workers=2,
                          steps=6)
    for position, batch in enumerate(loader):
        expected = direct.batch(position)
        torch.testing.assert_close(batch.tokens, expected.tokens)
        assert len(batch.images) == len(expected.images)
        for a, b in zip(batch.images, expected.images):
            np.testing.assert_array_equal(a, b)
    assert loader.position == 6

    with pytest.raises(FileNotFoundError, match="repa_image_root"):
        PackedDataset(pixel_data / "packs.parquet", repa_images="source", image_root=tmp_path / "nowhere")
    emptied = tmp_path / "emptied"
    shutil.copytree(pixel_data / "images", emptied)
    for path in emptied.rglob("*.png"):
        path.unlink()
    with pytest.raises(ImageDecodeError, match="REPA image of catalog row"):
        PackedDataset(pixel_data / "packs.parquet", repa_images="source", image_root=emptied)


# -- the objective and the loop -------------------------------------------------------------------

def test_the_repa_term_reaches_the_projector_and_only_up_to_its_block(pixel_data, vit_file):
    encoder = load_vision_encoder(vit_file)
    dataset = PackedDataset(pixel_data / "packs.parquet", repa_images="source")
    batch = dataset.batch(0)
    targets = repa_targets(encoder, batch.images, batch.sizes, "cpu")
    torch.manual_seed(0)
    model = build_model("tiny", in_channels=dataset.channels, patch_size=1, num_classes=2, repa_depth=1,
                        repa_dim=encoder.dim, repa_hidden=32)

    def gradients(weight: float):
        loss_fn = FlowMatchingLoss(null_class=model.null_class, repa_weight=weight)
        terms = loss_fn(model, batch, torch.Generator().manual_seed(0), repa_targets=targets)
        model.zero_grad()
        terms.loss.backward()
        return terms, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    half, half_grads = gradients(0.5)
    full, full_grads = gradients(1.0)
    assert half.repa is not None and 0 < float(half.repa) < 2
    torch.testing.assert_close(half.loss.detach(), half.mse + 0.5 * half.repa)
    # same draws, so the gradients differ by half the gradient of the alignment term alone
    repa_grads = {name: 2 * (full_grads[name] - half_grads[name]) for name in full_grads}
    assert all(repa_grads[name].abs().sum() > 0 for name in repa_grads if name.startswith("projector."))
    # below the projector: the patch embedding and block 1's modulation (its gates start at zero)
    assert repa_grads["x_embedder.proj.weight"].abs().sum() > 0
    assert repa_grads["blocks.0.adaLN_modulation.1.weight"].abs().sum() > 0
    # the projector reads block 1, so the alignment term cannot train block 2 or the output layer
    for name, grad in repa_grads.items():
        if name.startswith(("blocks.1.", "final_layer.")):
            torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)


def test_training_with_repa(pixel_data, vit_file, tmp_path):
    seen = []
    config = TrainConfig(packs=str(pixel_data / "packs.parquet"), out=str(tmp_path / "run"), model="tiny", steps=3,
                         lr=1e-3, workers=0, log_every=1, ckpt_every=1, keep_checkpoints=None, tensorboard=False,
                         weight_decay=0.0, repa_encoder=vit_file, repa_depth=1, repa_weight=0.5, repa_hidden=32,
                         repa_image_root=str(pixel_data / "images"))  # this catalog stores no REPA images
    summary = train(config, on_step=lambda step, batch, terms: seen.append(terms))
    assert summary.final_step == 3 and all(np.isfinite(summary.losses))
    assert all(t.repa is not None and torch.isfinite(t.repa) for t in seen)

    steps = sorted((tmp_path / "run" / "checkpoints").glob(f"{STEP_PREFIX}*"))
    assert len(steps) == 3
    first, last = (load_file(str(path / "model.safetensors")) for path in (steps[0], steps[-1]))
    assert first.keys() == set(summary.model.state_dict())  # the frozen encoder is not in the checkpoint
    assert any(not torch.equal(first[k], last[k]) for k in first if k.startswith("projector."))

    info = read_run_info(tmp_path / "run")
    assert info["repa"] == {"encoder": vit_file, "patch_size": ENCODER_PATCH, "dim": 16, "prefix_tokens": 1,
                            "normalization": "imagenet"}
    assert (info["model"]["repa_depth"], info["model"]["repa_dim"]) == (1, 16)
    model, _ = load_model(tmp_path / "run")
    assert model.projector is not None

    with pytest.raises(ValueError, match="repa_weight"):
        TrainConfig(packs="p", repa_encoder=vit_file, repa_weight=0.0)
