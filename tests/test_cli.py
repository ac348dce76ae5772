"""The command line: real runs on a tiny checkpoint, and one-line errors for bad input."""
import json
import pickle

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from actvar_export.cli import main


class Evil:
    """Any class: unpickling it would run arbitrary code paths, so weights_only must refuse it."""


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r


def assert_one_line_error(r, *needles, code=1):
    assert r.exit_code == code, r.output
    lines = [l for l in r.output.strip().splitlines() if l.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_inspect_official_depths_json():
    for d in (16, 20, 24, 30):
        r = run("inspect", "--depth", d, "--json")
        assert r.exit_code == 0, r.output
        info = json.loads(r.output)
        assert info["width"] == 64 * d
        assert info["static_sizes"]["k_t"][8:] == [127, 192] and info["static_sizes"]["k_w"] == 12
        assert info["flops"]["paper_saving_percent"] is not None
    r = run("inspect", "--depth", 30)
    assert "ActVAR saving" in r.output and "paper: 22.3%" in r.output


def test_inspect_checkpoint(actvar_ckpt):
    r = run("inspect", "--ckpt", actvar_ckpt)
    assert r.exit_code == 0, r.output
    assert "VAR-d2" in r.output and "RANDOM WEIGHTS" in r.output and "K_w=12" in r.output


def test_sample_writes_grid(actvar_ckpt, tmp_path):
    out = tmp_path / "g.png"
    r = run("sample", "--ckpt", actvar_ckpt, "--classes", "1,2", "--seed", 3, "--sampler", "noise", "--out", out)
    assert r.exit_code == 0, r.output
    img = Image.open(out)
    assert img.size[0] > 2 * 256 and img.size[1] > 256


def test_init_ckpt_help_says_random():
    r = run("init-ckpt", "--help")
    assert "RANDOM" in r.output


@pytest.mark.parametrize("args, needles", [
    (["--token-ratio", "1.5"], ["--token-ratio", "1.5"]),
    (["--expert-ratio", "0"], ["--expert-ratio"]),
    (["--active-scales", "8,12"], ["active scale 12"]),
    (["--active-scales", "x"], ["--active-scales"]),
    (["--classes", "1000"], ["--classes"]),
    (["--top-p", "2"], ["--top-p"]),
])
def test_sample_bad_options(actvar_ckpt, tmp_path, args, needles):
    assert_one_line_error(run("sample", "--ckpt", actvar_ckpt, "--out", tmp_path / "x.png", *args), *needles)
    assert not (tmp_path / "x.png").exists()


def test_bad_files(actvar_ckpt, tmp_path):
    data = actvar_ckpt.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run("inspect", "--ckpt", tmp_path / "trunc.pt"), "trunc.pt", "truncated")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert_one_line_error(run("inspect", "--ckpt", tmp_path / "notes.txt"), "notes.txt", "not a")
    assert_one_line_error(run("inspect", "--ckpt", tmp_path / "nope.pt"), "no such file")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    torch.save({"model": {"x": torch.zeros(1)}, "obj": Evil()}, tmp_path / "evil2.pt")
    assert_one_line_error(run("inspect", "--ckpt", tmp_path / "evil.pt"), "evil.pt", "not a PyTorch checkpoint")
    assert_one_line_error(run("inspect", "--ckpt", tmp_path / "evil2.pt"), "evil2.pt", "weights_only=True")


def test_wrong_vae(actvar_ckpt, tmp_path):
    # a VAR checkpoint passed as --vae, and a VQVAE whose decoder does not fit
    dense = tmp_path / "d3.pt"
    assert run("init-ckpt", "--depth", 3, "--dense", "--out", dense).exit_code == 0
    r = run("sample", "--ckpt", actvar_ckpt, "--vae", dense, "--out", tmp_path / "x.png")
    assert_one_line_error(r, "not a VQVAE")
    vae_sd = torch.load(actvar_ckpt, weights_only=True)["vae"]
    vae_sd.pop("decoder.conv_out.bias")
    torch.save(vae_sd, tmp_path / "vae.pth")
    r = run("sample", "--ckpt", actvar_ckpt, "--vae", tmp_path / "vae.pth", "--out", tmp_path / "x.png")
    assert_one_line_error(r, "missing key 'decoder.conv_out.bias'")


def test_init_ckpt_bad_input(tmp_path):
    assert_one_line_error(run("init-ckpt", "--depth", 0, "--out", tmp_path / "a.pt"), "depth")
    assert_one_line_error(run("init-ckpt", "--depth", 2, "--experts", 7, "--out", tmp_path / "a.pt"), "7 experts")
    assert not (tmp_path / "a.pt").exists()
