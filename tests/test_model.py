import pytest
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from nrtrain.flops import model_flops
from nrtrain.model import PRESETS, NiT, NiTConfig, TimestepEmbedder, build_model, load_nit_checkpoint
from nrtrain.packed import pack_latents, packed_from_tokens, patchify
from nrtrain.rope import RopeExtrapolation

C, P = 4, 2
SIZES = [(2, 3), (4, 4), (3, 1), (1, 5)]


def make_pack(sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(h * w, C * P * P, generator=g) for h, w in sizes]
    return packed_from_tokens(tokens, sizes, torch.randint(0, 10, (len(sizes),), generator=g))


def randomized(model, seed=0):
    """Replace the zero-initialised adaLN/final weights too, so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def tiny(**overrides):
    return build_model("tiny", C, P, num_classes=10, **overrides)


def single_image_batch(batch, i):
    h, w = batch.sizes[i].tolist()
    start, end = int(batch.cu_seqlens[i]), int(batch.cu_seqlens[i + 1])
    return packed_from_tokens([batch.tokens[start:end]], [(h, w)], batch.labels[i:i + 1]), start, end


@pytest.mark.parametrize("attention, grid, mlp", [("sdpa-loop", "rowcol", "gelu"), ("masked-sdpa", "nit", "gelu"),
                                                  ("sdpa-loop", "nit", "swiglu")])
def test_packed_forward_equals_each_image_alone(attention, grid, mlp):
    torch.manual_seed(0)
    model = randomized(tiny(attention=attention, rope_grid=grid, mlp=mlp)).eval()
    batch = make_pack()
    t = torch.rand(batch.num_images)
    with torch.no_grad():
        packed = model(batch.tokens, t, batch.labels, batch)
        assert packed.shape == batch.tokens.shape
        for i in range(batch.num_images):
            alone, start, end = single_image_batch(batch, i)
            out = model(alone.tokens, t[i:i + 1], alone.labels, alone)
            torch.testing.assert_close(packed[start:end], out, atol=1e-5, rtol=1e-5)


def test_backends_agree_on_outputs_and_gradients():
    batch = make_pack()
    t = torch.rand(batch.num_images)
    results = []
    for backend in ("sdpa-loop", "masked-sdpa"):
        model = randomized(tiny(attention=backend))
        out = model(batch.tokens, t, batch.labels, batch)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_modulation_is_computed_once_per_image():
    model = randomized(tiny())
    batch = make_pack()
    rows = []
    linears = [block.adaLN_modulation[1] for block in model.blocks] + [model.final_layer.adaLN_modulation[1]]
    hooks = [m.register_forward_hook(lambda mod, inputs, out: rows.append(inputs[0].shape[0])) for m in linears]
    model(batch.tokens, torch.rand(batch.num_images), batch.labels, batch)
    for hook in hooks:
        hook.remove()
    assert rows == [batch.num_images] * len(linears)
    assert batch.num_tokens > batch.num_images


def test_fresh_model_follows_nit_initialisation():
    torch.manual_seed(0)
    model = build_model("tiny", C, P)
    for block in model.blocks:
        assert not block.adaLN_modulation[1].weight.any() and not block.adaLN_modulation[1].bias.any()
        bound = (6 / sum(block.attn.qkv.weight.shape)) ** 0.5  # xavier-uniform
        assert block.attn.qkv.weight.abs().max() <= bound and block.attn.qkv.weight.std() > bound / 4
        assert not block.attn.qkv.bias.any()
    assert not model.final_layer.linear.weight.any()
    assert 0.015 < model.y_embedder.embedding_table.weight.std() < 0.025
    assert model.y_embedder.embedding_table.weight.shape[0] == 1001 and model.null_class == 1000
    assert 0.015 < model.t_embedder.mlp[0].weight.std() < 0.025
    batch = make_pack()
    out = model(batch.tokens, torch.rand(batch.num_images), torch.zeros(batch.num_images, dtype=torch.long), batch)
    assert not out.any()  # adaLN-Zero: the untrained model predicts zero


def test_timestep_features_are_cos_then_sin_of_raw_t():
    features = TimestepEmbedder.sinusoidal(torch.tensor([0.0, 0.5]), 8)
    assert features[0].tolist() == [1.0] * 4 + [0.0] * 4
    torch.testing.assert_close(features[1, 0], torch.cos(torch.tensor(0.5)))  # frequency 1 first, t not scaled
    torch.testing.assert_close(features[1, 4], torch.sin(torch.tensor(0.5)))


def test_repa_output_is_projection_of_the_chosen_block():
    model = randomized(tiny(repa_depth=1, repa_dim=12, repa_hidden=32))
    batch = make_pack()
    seen = []
    model.blocks[0].register_forward_hook(lambda mod, inputs, out: seen.append(out))
    out, projected = model(batch.tokens, torch.rand(batch.num_images), batch.labels, batch, return_repa=True)
    assert out.shape == batch.tokens.shape and projected.shape == (batch.num_tokens, 12)
    torch.testing.assert_close(projected, model.projector(seen[0]))
    with pytest.raises(ValueError, match="repa_depth"):
        tiny()(batch.tokens, torch.rand(batch.num_images), batch.labels, batch, return_repa=True)


def test_extrapolation_within_training_size_leaves_output_unchanged():
    model = randomized(tiny()).eval()
    batch = make_pack()
    t = torch.rand(batch.num_images)
    with torch.no_grad():
        plain = model(batch.tokens, t, batch.labels, batch)
        stretched = model(batch.tokens, t, batch.labels, batch,
                          extrapolation=RopeExtrapolation("yarn", train_size=(4, 5)))
        bigger = model(batch.tokens, t, batch.labels, batch, extrapolation=RopeExtrapolation("yarn", train_size=(2, 2)))
    torch.testing.assert_close(plain, stretched)
    assert not torch.allclose(plain, bigger)


def test_patch_embedding_loads_a_conv_weight_and_acts_like_the_conv():
    model = tiny()
    conv = torch.nn.Conv2d(C, model.config.hidden, P, stride=P)
    model.x_embedder.load_state_dict({"proj.weight": conv.weight.detach(), "proj.bias": conv.bias.detach()})
    latent = torch.randn(C, 3 * P, 5 * P)
    expected = conv(latent[None])[0].flatten(1).T  # [h*w, D], row-major tokens
    torch.testing.assert_close(model.x_embedder(patchify(latent, P)), expected, atol=1e-5, rtol=1e-5)


def nit_checkpoint_layout(d, channels, patch, depth, heads, classes, z_dim=None, projector=2048):
    """Key → shape of a NiT release (shared/reference/nit.md §4.1), written from the documented layout."""
    head_dim, width, out = d // heads, 4 * d, channels * patch * patch
    shapes = {
        "x_embedder.proj.weight": (d, channels, patch, patch), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.linear.weight": (out, d), "final_layer.linear.bias": (out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.q_norm.weight": (head_dim,), b + "attn.q_norm.bias": (head_dim,),
            b + "attn.k_norm.weight": (head_dim,), b + "attn.k_norm.bias": (head_dim,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (width, d), b + "mlp.fc1.bias": (width,),
            b + "mlp.fc2.weight": (d, width), b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        })
    if z_dim:
        shapes.update({"projector.0.weight": (projector, d), "projector.0.bias": (projector,),
                       "projector.2.weight": (projector, projector), "projector.2.bias": (projector,),
                       "projector.4.weight": (z_dim, projector), "projector.4.bias": (z_dim,)})
    return shapes


def nit_state_dict(seed=0, **layout):
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=g) * 0.1 for key, shape in nit_checkpoint_layout(**layout).items()}


TINY_LAYOUT = dict(d=64, channels=C, patch=P, depth=2, heads=4, classes=10)


def test_load_nit_checkpoint_fills_every_tensor(tmp_path):
    state = nit_state_dict(**TINY_LAYOUT, z_dim=12, projector=32)
    model = tiny(rope_grid="nit")
    report = load_nit_checkpoint(model, state)
    assert report.converted == ["x_embedder.proj.weight"]
    assert sorted(report.ignored) == sorted(k for k in state if k.startswith("projector."))
    loaded = model.state_dict()
    assert set(report.loaded) == set(loaded)
    for key, tensor in loaded.items():
        assert torch.equal(tensor, state[key].reshape(tensor.shape)), key

    # through a file, into a model that keeps the projector, and back out through our own state dict
    path = tmp_path / "nit.safetensors"
    save_file(state, str(path))
    with_projector = tiny(rope_grid="nit", repa_depth=1, repa_dim=12, repa_hidden=32)
    assert load_nit_checkpoint(with_projector, path).ignored == []
    assert torch.equal(with_projector.projector[4].weight, state["projector.4.weight"])
    again = tiny(rope_grid="nit", repa_depth=1, repa_dim=12, repa_hidden=32)
    load_nit_checkpoint(again, with_projector.state_dict())
    batch = make_pack()
    t = torch.rand(batch.num_images)
    with torch.no_grad():
        torch.testing.assert_close(again(batch.tokens, t, batch.labels, batch),
                                   with_projector(batch.tokens, t, batch.labels, batch))


def test_load_nit_checkpoint_refuses_what_does_not_fit():
    state = nit_state_dict(**TINY_LAYOUT)
    missing = dict(state)
    del missing["blocks.1.attn.k_norm.weight"]
    with pytest.raises(ValueError, match=r"missing from checkpoint: \['blocks.1.attn.k_norm.weight'\]"):
        load_nit_checkpoint(tiny(rope_grid="nit"), missing)
    shapes = r"y_embedder.embedding_table.weight: checkpoint \(11, 64\) vs model \(1001, 64\)"
    with pytest.raises(ValueError, match=shapes):
        load_nit_checkpoint(build_model("tiny", C, P, rope_grid="nit"), state)
    extra = {**state, "blocks.2.attn.qkv.weight": torch.zeros(192, 64)}
    with pytest.raises(ValueError, match="not in the model"):
        load_nit_checkpoint(tiny(rope_grid="nit"), extra)
    with pytest.raises(ValueError, match="rope_grid='nit'"):
        load_nit_checkpoint(tiny(), state)
    untouched = tiny(rope_grid="nit")
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(ValueError):
        load_nit_checkpoint(untouched, missing)
    assert all(torch.equal(before[k], v) for k, v in untouched.state_dict().items())


@pytest.mark.parametrize("preset, published", [("S", 33e6), ("B", 131e6), ("L", 457e6), ("XL", 675e6)])
def test_preset_parameter_counts_match_nit(preset, published):
    with torch.device("meta"):
        model = build_model(preset, 32, 1)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - published) / published < 0.02
    assert model.config.depth == PRESETS[preset]["depth"]


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible by heads"):
        NiT(C, P, hidden=60, depth=1, heads=8)
    with pytest.raises(ValueError, match="repa_dim"):
        NiTConfig(C, P, hidden=64, depth=2, heads=4, repa_depth=1)
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("XXXL", C, P)


def test_flops_hand_count_for_a_micro_config():
    config = NiTConfig(in_channels=2, patch_size=1, hidden=8, depth=1, heads=2)
    # per token: embed 2*8 + qkv 8*24 + proj 8*8 + fc1 8*32 + fc2 32*8 + final 8*2 = 800 MACs
    # per image: t-MLP 256*8 + 8*8, adaLN 8*48, final adaLN 8*16 = 2624 MACs
    # attention: 4 * (2^2 + 3^2) * 8 = 416 FLOPs
    expected = 2 * 5 * 800 + 2 * 2 * 2624 + 416
    assert model_flops(config, [2, 3]) == expected
    assert model_flops(config, [2, 3], training=True) == 3 * expected


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_flops_match_counted_matmuls_of_a_real_forward(mlp):
    model = tiny(mlp=mlp, repa_depth=1, repa_dim=12, repa_hidden=32).eval()
    batch = make_pack()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(batch.tokens, torch.rand(batch.num_images), batch.labels, batch, return_repa=True)
    seqlens = batch.seqlens()
    # FlopCounterMode sees the GEMMs but not CPU SDPA; attention is depth * sum 4 n^2 D
    attention = 2 * sum(4 * n * n * 64 for n in seqlens)
    assert model_flops(model.config, seqlens) == counter.get_total_flops() + attention
    assert model_flops(model.config, seqlens, repa=False) < model_flops(model.config, seqlens)


def test_works_on_latents_packed_by_pack_latents():
    model = randomized(tiny()).eval()
    batch = pack_latents([torch.randn(C, 4 * P, 2 * P), torch.randn(C, 2 * P, 2 * P)], [1, 2], P)
    with torch.no_grad():
        out = model(batch.tokens, torch.rand(2), batch.labels, batch)
    assert out.shape == (12, C * P * P) and torch.isfinite(out).all()


def test_runs_under_bf16_autocast_and_in_bf16_close_to_fp32():
    model = randomized(tiny())
    batch = make_pack()
    t = torch.rand(batch.num_images)
    reference = model(batch.tokens, t, batch.labels, batch).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(batch.tokens, t, batch.labels, batch)
    mixed.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        half = model.to(torch.bfloat16)(batch.tokens.bfloat16(), t.double(), batch.labels, batch)
    scale = reference.abs().mean()
    for out in (mixed, half):
        assert out.dtype == torch.bfloat16
        assert (out.float() - reference).abs().mean() < 0.05 * scale
