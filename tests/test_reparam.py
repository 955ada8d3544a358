"""Scale reparameterization is exact: in FP, and in the quantized codes of the post-LayerNorm activations."""

import copy

import pytest
import torch

from repq_tvm.quant.config import QuantConfig, method_config
from repq_tvm.quant.calibrate import calibrate
from repq_tvm.quant.quantizers import LogQuantizer, UniformQuantizer
from repq_tvm.quant.reparam import reparameterize
from repq_tvm.quant.wrap import norm_pairs, quantize_model, quantizers, set_quant_state

from conftest import small_model


def _channelwise_calibrated(name, images, integer_zero_point=True):
    model = quantize_model(small_model(name), QuantConfig(w_bits=8, a_bits=4))
    set_quant_state(model, calibrating=True)
    with torch.no_grad():
        model(images)
    set_quant_state(model)
    return model


@pytest.mark.parametrize("name", ["vit_cifar10", "swin_cifar10"])
def test_norm_pairs(name):
    model = small_model(name)
    pairs = norm_pairs(model)
    blocks = 6 if name == "vit_cifar10" else 6
    merges = 0 if name == "vit_cifar10" else 2
    assert len(pairs) == 2 * blocks + merges
    assert all(isinstance(model.get_submodule(n), torch.nn.LayerNorm) for n, _ in pairs)
    assert all(isinstance(model.get_submodule(l), torch.nn.Linear) for _, l in pairs)


@pytest.mark.parametrize("name", ["vit_cifar10", "swin_cifar10"])
def test_reparameterized_fp_model_equals_original(name, images):
    model = _channelwise_calibrated(name, images)
    set_quant_state(model, enabled=False)
    with torch.no_grad():
        before = model(images)
        reparameterize(model)
        after = model(images)
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4), (before - after).abs().max()
    # the LayerNorm affines really changed: the test is not vacuous
    norm = model.get_submodule(norm_pairs(model)[0][0])
    assert not torch.allclose(norm.weight, small_model(name).get_submodule(norm_pairs(model)[0][0]).weight)


def _pair_outputs(model, images, integer_zero_point):
    """Output of every post-LN linear with only its input quantizer on (weights in FP)."""
    outs = {}
    hooks = [model.get_submodule(lin).register_forward_hook(lambda m, i, o, lin=lin: outs.__setitem__(lin, o))
             for _, lin in norm_pairs(model)]
    for q in quantizers(model).values():
        q.enabled = False
    for _, lin in norm_pairs(model):
        model.get_submodule(lin).input_quantizer.enabled = True
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return outs


def _pair_inputs_and_linears(model, images):
    """FP inputs of every post-LN linear (all quantizers off), with each linear's weight, bias and input quantizer."""
    inputs = {}
    hooks = [model.get_submodule(lin).register_forward_pre_hook(lambda m, i, lin=lin: inputs.__setitem__(lin, i[0]))
             for _, lin in norm_pairs(model)]
    set_quant_state(model, enabled=False)
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    out = {}
    for _, lin in norm_pairs(model):
        m = model.get_submodule(lin)
        q = copy.deepcopy(m.input_quantizer)
        bias = torch.zeros(m.out_features) if m.bias is None else m.bias.detach().clone()  # Swin's reduction has none
        out[lin] = (inputs[lin], m.weight.detach().clone(), bias, q)
    return out


@pytest.mark.parametrize("name", ["vit_cifar10", "swin_cifar10"])
def test_layerwise_quantized_output_equals_channelwise(name, images):
    """The spec's exactness claim, checked where it holds: the layer-wise quantizer on the reparameterized
    activation sees the same unrounded code as the channel-wise one on the original (to float tolerance), so
    the rounded codes agree except at exact rounding ties; and the same codes give the same linear output."""
    model = _channelwise_calibrated(name, images)
    before = _pair_inputs_and_linears(model, images)
    reparameterize(model, integer_zero_point=True)
    after = _pair_inputs_and_linears(model, images)
    for lin, (x, w, b, q) in before.items():
        x_t, w_t, b_t, q_t = after[lin]
        assert q.channel_wise and not q_t.channel_wise and q_t.scale.dim() == 0
        s, z, s_t, z_t, top = q.scale, q.zero_point, q_t.scale, q_t.zero_point, 2 ** q.bits - 1
        assert z_t == torch.round(z_t)
        u, u_t = x / s + z, x_t / s_t + z_t  # unrounded codes
        assert (u - u_t).abs().max() < 1e-3, (lin, (u - u_t).abs().max())
        codes = torch.clamp(torch.round(u), 0, top)
        flips = codes != torch.clamp(torch.round(u_t), 0, top)
        distance_to_tie = ((u - torch.floor(u)) - 0.5).abs()
        assert (distance_to_tie[flips] < 1e-3).all() and flips.float().mean() < 1e-4, (lin, int(flips.sum()))
        out = torch.nn.functional.linear((codes - z) * s, w, b)
        out_t = torch.nn.functional.linear((codes - z_t) * s_t, w_t, b_t)
        err = (out - out_t).abs().max() / out.abs().max()
        assert err < 1e-4, (lin, err)


def test_float_zero_point_is_not_exact(images):
    """The reference's non-integer mean zero point shifts the grid: codes (and outputs) move."""
    model = _channelwise_calibrated("vit_cifar10", images)
    channel = _pair_outputs(model, images, False)
    reparameterize(model, integer_zero_point=False)
    layer = _pair_outputs(model, images, False)
    worst = max(((channel[k] - layer[k]).abs().max() / channel[k].abs().max()).item() for k in channel)
    assert worst > 1e-3


@pytest.mark.parametrize("name", ["vit_cifar10", "swin_cifar10"])
def test_calibrated_model_holds_only_inference_quantizers(name, images):
    model = calibrate(small_model(name), images, method_config("repq-vit", 4, 4), progress=False)
    for qname, q in quantizers(model).items():
        assert q.ready, qname
        if qname.endswith("weight_quantizer"):
            assert q.channel_wise
        elif isinstance(q, UniformQuantizer):
            assert not q.channel_wise, qname
            assert q.zero_point == torch.round(q.zero_point)
        else:
            assert isinstance(q, LogQuantizer) and q.sqrt2 and "matmul_av" in qname
    assert model.patch_embed.proj.input_quantizer.bits == 8
    assert model.get_submodule(norm_pairs(model)[0][1]).input_quantizer.bits == 4


def test_quantized_model_tracks_fp_at_8_bits(images):
    fp = small_model("vit_cifar10")
    with torch.no_grad():
        ref = fp(images)
    q = calibrate(small_model("vit_cifar10"), images, method_config("repq-vit", 8, 8), progress=False)
    with torch.no_grad():
        out = q(images)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99


def test_calibration_with_progress_bar_gives_the_same_model(images):
    """The progress hooks must observe the calibration, not change it."""
    quiet = calibrate(small_model("vit_cifar10"), images, method_config("repq-vit", 4, 4), progress=False)
    shown = calibrate(small_model("vit_cifar10"), images, method_config("repq-vit", 4, 4), progress=True)
    with torch.no_grad():
        assert torch.equal(quiet(images), shown(images))
