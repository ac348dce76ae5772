"""Strict loading against the official key set (read from the shared keys file, an independent source)."""
import re

import pytest
import torch

from actvar_export.checkpoint import (_torch_load, check_state_dict, expected_shapes, infer_spec, load_checkpoint,
                                      vae_expected_shapes)
from actvar_export.config import ActVarConfig, ModelSpec, VarConfig
from actvar_export.errors import CheckpointError
from actvar_export.model import VAR

from .conftest import KEYS_FILE


def official_keys(section: str):
    """key -> shape for one '## <file>' section of the shared keys file."""
    text = KEYS_FILE.read_text()
    body = text.split(f"## {section}")[1].split("\n## ")[0]
    out = {}
    for line in body.splitlines()[1:]:
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")[:2]
        out[key] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return out


def meta_state_dict(keys):
    return {k: torch.empty(s, device="meta") for k, s in keys.items()}


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_official_var_keys_load_strictly(depth):
    keys = official_keys(f"var_d{depth}.pth")
    assert len(keys) == 8 + 13 * depth + 4
    sd = meta_state_dict(keys)
    spec = infer_spec(sd, None, "x")
    assert spec.var.depth == depth and spec.actvar is None
    assert expected_shapes(spec) == keys
    with torch.device("meta"):
        m = VAR(spec)
    m.load_state_dict(sd, strict=True, assign=True)  # the reference module itself accepts the official layout


def test_official_vae_keys():
    assert vae_expected_shapes() == official_keys("vae_ch160v4096z32.pth")


def test_actvar_keys_are_official_plus_selector_router():
    keys = official_keys("var_d16.pth")
    exp = expected_shapes(ModelSpec(VarConfig(16), ActVarConfig(num_experts=8)))
    extra = {k: s for k, s in exp.items() if k not in keys}
    assert set(keys) <= set(exp)
    assert extra == {f"blocks.{i}.{n}": s for i in range(16) for n, s in
                     [("selector.weight", (1, 1024)), ("selector.bias", (1,)),
                      ("ffn.router.weight", (8, 1024)), ("ffn.router.bias", (8,))]}


@pytest.mark.parametrize("mutate, message", [
    (lambda sd: sd.pop("blocks.3.ffn.fc2.bias"), r"missing key 'blocks\.3\.ffn\.fc2\.bias'"),
    (lambda sd: sd.__setitem__("blocks.0.ffn.extra", torch.empty(1, device="meta")), r"unexpected key 'blocks\.0\.ffn\.extra'"),
    (lambda sd: sd.__setitem__("head.weight", torch.empty(4096, 1000, device="meta")), r"head\.weight has shape \(4096, 1000\), expected \(4096, 1920\)"),
])
def test_bad_keys_are_named(mutate, message):
    sd = meta_state_dict(official_keys("var_d30.pth"))
    mutate(sd)
    spec = infer_spec(sd, None, "x")
    with pytest.raises(CheckpointError, match=message):
        check_state_dict(sd, expected_shapes(spec), "ckpt")


def test_pre_normalised_attention_is_refused():
    sd = meta_state_dict(official_keys("var_d16.pth"))
    for k in [k for k in sd if k.endswith("scale_mul_1H11")]:
        del sd[k]
    with pytest.raises(CheckpointError, match="predates normalised attention"):
        infer_spec(sd, None, "old.pth")


def _tiny_sd(depth=2, actvar=None):
    from .conftest import make_model
    return make_model(depth, actvar).state_dict()


def test_training_checkpoint_nested(tmp_path, vae):
    sd = _tiny_sd()
    torch.save({"trainer": {"var_wo_ddp": sd}, "args": {"depth": 2}}, tmp_path / "ar-ckpt-best.pth")
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    ck = load_checkpoint(tmp_path / "ar-ckpt-best.pth", tmp_path / "vae.pth")
    assert ck.spec.var.depth == 2 and ck.spec.actvar is None
    assert torch.equal(ck.var_sd["head.weight"], sd["head.weight"])


def test_wrapped_actvar_settings_and_overrides(tmp_path):
    act = ActVarConfig(num_experts=4, expert_ratio=0.5, token_ratio=0.6, active_scales=(7, 9))
    torch.save({"model": _tiny_sd(actvar=act), "actvar": act.to_dict()}, tmp_path / "a.pt")
    ck = load_checkpoint(tmp_path / "a.pt")
    assert ck.spec.actvar == act
    ck = load_checkpoint(tmp_path / "a.pt", overrides={"token_ratio": 1.0, "active_scales": (9,)})
    assert ck.spec.actvar.token_ratio == 1.0 and ck.spec.actvar.active_scales == (9,)
    # a plain state dict with router keys: N from the router shape, defaults for the rest
    torch.save(_tiny_sd(actvar=act), tmp_path / "plain.pt")
    assert load_checkpoint(tmp_path / "plain.pt").spec.actvar == ActVarConfig(num_experts=4)


def test_vae_of_wrong_kind_or_shape(tmp_path, vae):
    sd = _tiny_sd()
    torch.save(sd, tmp_path / "var.pt")
    with pytest.raises(CheckpointError, match="not a VQVAE"):
        load_checkpoint(tmp_path / "var.pt", tmp_path / "var.pt")
    vsd = dict(vae.state_dict())
    vsd["decoder.conv_in.weight"] = torch.zeros(640, 16, 3, 3)
    torch.save(vsd, tmp_path / "vae_bad.pt")
    with pytest.raises(CheckpointError, match=r"decoder\.conv_in\.weight has shape"):
        load_checkpoint(tmp_path / "var.pt", tmp_path / "vae_bad.pt")


def test_unreadable_files(tmp_path, actvar_ckpt):
    data = actvar_ckpt.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _torch_load(tmp_path / "trunc.pt")
    (tmp_path / "text.pt").write_text("hello, not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a"):
        _torch_load(tmp_path / "text.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        _torch_load(tmp_path / "missing.pt")
