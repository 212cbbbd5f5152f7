"""The token-mixer interface (``linvision.attn.TokenMixer``) and mechanism options reaching the mixers from
``timm.create_model(..., attn_kwargs=...)``."""
import inspect

import pytest
import timm
import torch

import linvision  # noqa: F401  (registers the models)
from linvision.attn import MIXERS, RopeGrid, TokenMixer, create_mixer, rope_angle

LINEAR = sorted(set(MIXERS) - {"softmax"})


def _mixers(model):
    return [m for m in model.modules() if isinstance(m, TokenMixer)]


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_mixer_implements_the_interface(name):
    cls = MIXERS[name]
    assert issubclass(cls, TokenMixer)
    params = inspect.signature(cls.forward).parameters
    assert list(params)[:4] == ["self", "q", "k", "v"]
    for arg, default in (("hw", inspect.Parameter.empty), ("rope", None), ("token_mean", None)):
        assert params[arg].kind is inspect.Parameter.KEYWORD_ONLY and params[arg].default is default, (name, arg)
    mixer = create_mixer(name, 32, 2)
    assert isinstance(mixer.uses_rope, bool)
    if name == "softmax":
        assert mixer.backend == "sdpa" and cls.options() == ()
    else:
        assert "backend" in cls.options() and mixer.backend == "auto"
        assert create_mixer(name, 32, 2, backend="torch").backend == "torch"
    q, k, v = (torch.randn(2, 2, 12, 16) for _ in range(3))
    rope = RopeGrid(rope_angle(16), 3, 4) if mixer.uses_rope else None
    out = mixer(q, k, v, hw=(3, 4), rope=rope, token_mean=None)
    assert out.shape == v.shape


def test_unknown_option_is_one_line_naming_mechanism_and_options():
    with pytest.raises(TypeError) as info:
        create_mixer("focused", 32, 2, focusing_pwr=4)
    message = str(info.value)
    assert "\n" not in message and "'focused' attention (FocusedLinearAttention)" in message
    assert "'focusing_pwr'" in message and "focusing_power" in message and "backend" in message
    with pytest.raises(TypeError, match=r"'infsa' attention \(InfiniteSelfAttention\) has no option 'shape'.*form"):
        timm.create_model("linvit_t_infsa", attn_kwargs=dict(shape="pure"))


def test_focusing_power_reaches_every_mixer_and_changes_the_output():
    x = torch.randn(1, 3, 64, 64)
    outs = []
    for power in (3, 4):
        torch.manual_seed(0)
        model = timm.create_model("linvit_t_focused", attn_kwargs=dict(focusing_power=power)).eval()
        mixers = _mixers(model)
        assert len(mixers) == 12 and all(m.focusing_power == power for m in mixers)
        with torch.no_grad():
            outs.append(model(x))
    assert not torch.allclose(outs[0], outs[1])


def test_infsa_form_pure_against_linear():
    x = torch.randn(1, 3, 32, 32)
    outs = {}
    for form in ("linear", "pure"):
        torch.manual_seed(0)
        model = timm.create_model("linvit_t_infsa", attn_kwargs=dict(form=form)).eval()
        assert {m.form for m in _mixers(model)} == {form}
        with torch.no_grad():
            outs[form] = model(x)
    assert not torch.allclose(outs["linear"], outs["pure"])


def test_mirror_switches_and_backend_reach_the_mixers():
    model = timm.create_model("linvit_t_mirror", attn_kwargs=dict(variance_modulation=False, cross_head_reflections=0,
                                                                   backend="torch"))
    mixers = _mixers(model)
    assert mixers and all(m.angle_gain is None and m.cross_head_direction.shape[0] == 0 for m in mixers)
    assert {m.backend for m in mixers} == {"torch"}
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def test_softmax_stages_take_no_options():
    model = timm.create_model("mavit_t", attn_kwargs=dict(eps=1e-3, backend="torch"))
    by_kind = {}
    for m in _mixers(model):
        by_kind.setdefault(type(m).__name__, []).append(m)
    assert {m.eps for m in by_kind["MagnitudeAwareLinearAttention"]} == {1e-3}
    assert {m.backend for m in by_kind["SoftmaxAttention"]} == {"sdpa"}
    # The options of the default mechanism are checked against it, not against softmax.
    with pytest.raises(TypeError, match="'mala' attention"):
        timm.create_model("mavit_t", attn_kwargs=dict(focusing_power=4))


def test_vit_hosts_accept_attn_kwargs():
    model = timm.create_model("inline_deit_t", img_size=32, patch_size=16, depth=1, attn_kwargs=dict(backend="torch"))
    assert {m.backend for m in _mixers(model)} == {"torch"}
    model = timm.create_model("infvit_linear_4l", img_size=32, patch_size=16, embed_dim=64, num_heads=2,
                              attn_kwargs=dict(rho_trainable=False, backend="torch"))
    assert all(not m.rho_logit.requires_grad and m.backend == "torch" for m in _mixers(model))
    with pytest.raises(TypeError, match="'inline' attention .* no option 'focusing_power'"):
        timm.create_model("inline_deit_t", attn_kwargs=dict(focusing_power=3))
