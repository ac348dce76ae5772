"""Every command against every bad input: exit code 1 (2 for validate), exactly one `Error:` line naming the problem,
no traceback, nothing new or changed where the command would write, no temporary file left.
Faults: a read-only and a full file system (small tmpfs mounts; skipped where mounting is not
permitted), SIGTERM/SIGHUP/SIGKILL during a d8 build in a subprocess."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from actvar_export.bundle import DIGESTS, MANIFEST, Bundle, build_bundle
from actvar_export.checkpoint import save_atomic
from actvar_export.cli import main

from .test_cli import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]


def _mount_tmpfs(path: Path, opts: str):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    return r.returncode == 0, (r.stderr.strip() or "mount failed")


def snapshot(root: Path) -> dict:
    """Every path under root, with size and modification time for files (the outputs' location)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        out.update({str((Path(dirpath) / n).relative_to(root)): "dir" for n in dirnames})
        for n in filenames:
            st = (Path(dirpath) / n).lstat()
            out[str((Path(dirpath) / n).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def W(actvar_ckpt, tmp_path_factory):
    """The work tree of the matrix: inputs, a bundle, bad files, a read-only and a full mount."""
    root = tmp_path_factory.mktemp("faults")
    w = {"root": root, "ckpt": root / "in" / "d2.pt", "bundle": root / "in" / "bundle", "out": root / "out"}
    w["ckpt"].parent.mkdir()
    shutil.copy(actvar_ckpt, w["ckpt"])
    (root / "in" / "notes.txt").write_text("the user's notes\n")
    w["out"].mkdir()
    build_bundle(w["ckpt"], w["bundle"], batch=2, precision="fp32", show_progress=False)
    bad = root / "bad"
    bad.mkdir()
    data = w["ckpt"].read_bytes()
    (bad / "trunc.pt").write_bytes(data[: len(data) // 2])
    (bad / "text.pt").write_text("not a checkpoint")
    (bad / "empty.pt").write_bytes(b"")
    sd = torch.load(w["ckpt"], weights_only=True)
    sd["actvar"]["token_ratio"] = 2.0
    save_atomic(sd, bad / "ratio.pt")
    save_atomic(sd["model"] | {}, bad / "novae.pt")  # a VAR state dict without a VQVAE
    torch.save(sd["model"], bad / "var_as_vae.pt")
    # the bundle with an edited manifest (batch 2 -> 4) and one with a truncated graph: hard links,
    # edited files replaced (never written through a link)
    for name in ("edited", "truncated", "nodigest"):
        shutil.copytree(w["bundle"], bad / name, copy_function=os.link)
    m = json.loads((bad / "edited" / MANIFEST).read_text())
    m["batch"] = 4
    (bad / "edited" / MANIFEST).unlink()
    (bad / "edited" / MANIFEST).write_text(json.dumps(m, indent=1))
    g = (bad / "truncated" / "step_4.onnx").read_bytes()
    (bad / "truncated" / "step_4.onnx").unlink()
    (bad / "truncated" / "step_4.onnx").write_bytes(g[:1000])
    (bad / "nodigest" / DIGESTS).unlink()
    (bad / "notbundle").mkdir()
    (bad / "notbundle" / "keep.txt").write_text("keep")
    w["bad"] = bad
    w["afile"] = root / "in" / "notes.txt"
    ok, why = _mount_tmpfs(root / "ro", "ro,size=1m")
    w["ro"] = root / "ro" if ok else None
    w["ro_why"] = why
    ok, why = _mount_tmpfs(root / "full", "size=64k")
    w["full"] = root / "full" if ok else None
    w["full_why"] = why
    yield w
    for m in ("ro", "full"):
        if w[m] is not None:
            subprocess.run(["umount", str(w[m])], check=False)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# (id, argv with {placeholders} from W, needles of the error line, mount needed)
CK, BU = "{ckpt}", "{bundle}"
CASES = [
    # init-ckpt
    ("init-depth", ["init-ckpt", "--depth", "0", "--out", "{out}/a.pt"], ["depth 0"]),
    ("init-experts", ["init-ckpt", "--depth", "2", "--experts", "7", "--out", "{out}/a.pt"], ["--experts 7", "512"]),
    ("init-out-dir", ["init-ckpt", "--depth", "2", "--out", "{out}"], ["is a directory"]),
    ("init-out-dot", ["init-ckpt", "--depth", "2", "--out", "."], ["is a directory"]),
    ("init-out-under-file", ["init-ckpt", "--depth", "2", "--out", "{afile}/a.pt"], ["notes.txt", "not a directory"]),
    ("init-ro", ["init-ckpt", "--depth", "2", "--out", "{ro}/a.pt"], ["read-only"], "ro"),
    # build
    ("build-missing", ["build", "--ckpt", "{bad}/nope.pt", "--out", "{out}/b"], ["nope.pt", "no such file"]),
    ("build-trunc", ["build", "--ckpt", "{bad}/trunc.pt", "--out", "{out}/b"], ["trunc.pt", "truncated"]),
    ("build-text", ["build", "--ckpt", "{bad}/text.pt", "--out", "{out}/b"], ["text.pt", "not a PyTorch checkpoint"]),
    ("build-empty", ["build", "--ckpt", "{bad}/empty.pt", "--out", "{out}/b"], ["empty.pt", "empty file"]),
    ("build-ckpt-dir", ["build", "--ckpt", "{bad}", "--out", "{out}/b"], ["is a directory"]),
    ("build-stored-ratio", ["build", "--ckpt", "{bad}/ratio.pt", "--out", "{out}/b"], ["ratio.pt", "token ratio 2.0"]),
    ("build-vae-var", ["build", "--ckpt", CK, "--vae", "{bad}/var_as_vae.pt", "--out", "{out}/b"], ["var_as_vae.pt", "not a VQVAE"]),
    ("build-batch", ["build", "--ckpt", CK, "--out", "{out}/b", "--batch", "0"], ["--batch 0"]),
    ("build-topk0", ["build", "--ckpt", CK, "--out", "{out}/b", "--top-k", "0"], ["--top-k 0"]),
    ("build-topk-big", ["build", "--ckpt", CK, "--out", "{out}/b", "--top-k", "4096"], ["--top-k 4096", "3840"]),
    ("build-token-ratio", ["build", "--ckpt", CK, "--out", "{out}/b", "--token-ratio", "1.5"], ["--token-ratio 1.5"]),
    ("build-expert-ratio-nan", ["build", "--ckpt", CK, "--out", "{out}/b", "--expert-ratio", "nan"], ["--expert-ratio nan"]),
    ("build-scales", ["build", "--ckpt", CK, "--out", "{out}/b", "--active-scales", "8,12"], ["active scale 12"]),
    ("build-scales-text", ["build", "--ckpt", CK, "--out", "{out}/b", "--active-scales", "x"], ["--active-scales"]),
    ("build-exists", ["build", "--ckpt", CK, "--out", BU], ["bundle", "--force"]),
    ("build-force-input-dir", ["build", "--ckpt", CK, "--out", "{root}/in", "--force"], ["d2.pt", "input"]),
    ("build-force-parent-of-input", ["build", "--ckpt", CK, "--out", "{root}", "--force"], ["d2.pt", "input"]),
    ("build-force-not-bundle", ["build", "--ckpt", CK, "--out", "{bad}/notbundle", "--force"], ["notbundle", "not a bundle"]),
    ("build-out-dot", ["build", "--ckpt", CK, "--out", ".", "--force"], ["current directory"]),
    ("build-out-file", ["build", "--ckpt", CK, "--out", "{afile}", "--force"], ["notes.txt", "not a directory"]),
    ("build-ro", ["build", "--ckpt", CK, "--out", "{ro}/b"], ["read-only"], "ro"),
    ("build-full", ["build", "--ckpt", CK, "--out", "{full}/b"], ["MB free"], "full"),
    # validate
    ("validate-no-bundle", ["validate", "--bundle", "{bad}/none", "--ckpt", CK], ["none", "no such bundle"]),
    ("validate-file-bundle", ["validate", "--bundle", "{afile}", "--ckpt", CK], ["notes.txt", "is a file"]),
    ("validate-not-bundle", ["validate", "--bundle", "{bad}/notbundle", "--ckpt", CK], ["manifest"]),
    ("validate-edited", ["validate", "--bundle", "{bad}/edited", "--ckpt", CK], ["manifest.json", "'batch'"]),
    ("validate-nodigest", ["validate", "--bundle", "{bad}/nodigest", "--ckpt", CK], [DIGESTS, "missing"]),
    ("validate-truncated", ["validate", "--bundle", "{bad}/truncated", "--ckpt", CK], ["step_4.onnx"]),
    ("validate-other-ckpt", ["validate", "--bundle", BU, "--ckpt", "{bad}/ratio.pt"], ["another checkpoint"]),
    ("validate-cfg-nan", ["validate", "--bundle", BU, "--ckpt", CK, "--cfg", "nan"], ["--cfg nan"]),
    ("validate-cfg-neg", ["validate", "--bundle", BU, "--ckpt", CK, "--cfg", "-1"], ["--cfg -1"]),
    ("validate-top-p", ["validate", "--bundle", BU, "--ckpt", CK, "--top-p", "2"], ["--top-p 2"]),
    ("validate-classes-empty", ["validate", "--bundle", BU, "--ckpt", CK, "--classes", ""], ["--classes is empty"]),
    ("validate-classes-count", ["validate", "--bundle", BU, "--ckpt", CK, "--classes", "1"], ["batch 2"]),
    ("validate-classes-range", ["validate", "--bundle", BU, "--ckpt", CK, "--classes", "1,1000"], ["1000"]),
    ("validate-providers", ["validate", "--bundle", BU, "--ckpt", CK, "--providers", "foo"], ["--providers", "foo"]),
    ("validate-json-dir", ["validate", "--bundle", BU, "--ckpt", CK, "--json", "{out}"], ["--json", "is a directory"]),
    ("validate-json-input", ["validate", "--bundle", BU, "--ckpt", CK, "--json", CK], ["--json", "input"]),
    ("validate-grid-ro", ["validate", "--bundle", BU, "--ckpt", CK, "--grid", "{ro}/g.png"], ["--grid", "read-only"], "ro"),
    ("validate-json-ro", ["validate", "--bundle", BU, "--ckpt", CK, "--json", "{ro}/r.json"], ["--json", "read-only"], "ro"),
    # sample, reference path
    ("sample-neither", ["sample", "--out", "{out}/g.png"], ["exactly one"]),
    ("sample-both", ["sample", "--ckpt", CK, "--bundle", BU, "--out", "{out}/g.png"], ["exactly one"]),
    ("sample-device", ["sample", "--ckpt", CK, "--device", "foo", "--out", "{out}/g.png"], ["--device 'foo'"]),
    ("sample-device-index", ["sample", "--ckpt", CK, "--device", "cuda:99", "--out", "{out}/g.png"], ["--device cuda:99"]),
    ("sample-cfg-nan", ["sample", "--ckpt", CK, "--cfg", "nan", "--out", "{out}/g.png"], ["--cfg nan"]),
    ("sample-top-p", ["sample", "--ckpt", CK, "--top-p", "2", "--out", "{out}/g.png"], ["--top-p 2"]),
    ("sample-top-k", ["sample", "--ckpt", CK, "--top-k", "-1", "--out", "{out}/g.png"], ["--top-k -1"]),
    ("sample-classes-empty", ["sample", "--ckpt", CK, "--classes", "", "--out", "{out}/g.png"], ["--classes is empty"]),
    ("sample-classes-range", ["sample", "--ckpt", CK, "--classes", "5,1000", "--out", "{out}/g.png"], ["1000"]),
    ("sample-classes-text", ["sample", "--ckpt", CK, "--classes", "a,b", "--out", "{out}/g.png"], ["--classes"]),
    ("sample-token-ratio", ["sample", "--ckpt", CK, "--token-ratio", "0", "--out", "{out}/g.png"], ["--token-ratio 0"]),
    ("sample-stored-ratio", ["sample", "--ckpt", "{bad}/ratio.pt", "--out", "{out}/g.png"], ["ratio.pt", "token ratio 2.0"]),
    ("sample-trunc", ["sample", "--ckpt", "{bad}/trunc.pt", "--out", "{out}/g.png"], ["trunc.pt", "truncated"]),
    ("sample-novae", ["sample", "--ckpt", "{bad}/novae.pt", "--out", "{out}/g.png"], ["novae.pt", "--vae"]),
    ("sample-out-dot", ["sample", "--ckpt", CK, "--out", "."], ["is a directory"]),
    ("sample-out-input", ["sample", "--ckpt", CK, "--out", CK], ["--out", "input"]),
    ("sample-out-under-file", ["sample", "--ckpt", CK, "--out", "{afile}/g.png"], ["not a directory"]),
    ("sample-ro", ["sample", "--ckpt", CK, "--out", "{ro}/g.png"], ["read-only"], "ro"),
    # sample, bundle path
    ("sample-b-cfg-nan", ["sample", "--bundle", BU, "--cfg", "nan", "--out", "{out}/g.png"], ["--cfg nan"]),
    ("sample-b-top-p", ["sample", "--bundle", BU, "--top-p", "2", "--out", "{out}/g.png"], ["--top-p 2"]),
    ("sample-b-top-k0", ["sample", "--bundle", BU, "--top-k", "0", "--out", "{out}/g.png"], ["--top-k 0", "sample --ckpt"]),
    ("sample-b-top-k", ["sample", "--bundle", BU, "--top-k", "50", "--out", "{out}/g.png"], ["top-k 900", "--top-k 50"]),
    ("sample-b-sampler", ["sample", "--bundle", BU, "--sampler", "official", "--out", "{out}/g.png"], ["noise sampler"]),
    ("sample-b-precision", ["sample", "--bundle", BU, "--precision", "fp16", "--out", "{out}/g.png"], ["--precision"]),
    ("sample-b-file", ["sample", "--bundle", "{afile}", "--out", "{out}/g.png"], ["notes.txt", "is a file"]),
    ("sample-b-edited", ["sample", "--bundle", "{bad}/edited", "--out", "{out}/g.png"], ["'batch'"]),
    ("sample-b-providers", ["sample", "--bundle", BU, "--providers", "tensorrt,cpu", "--out", "{out}/g.png"], ["lacks"]),
    ("sample-b-out-input", ["sample", "--bundle", BU, "--out", "{bundle}/weights.bin"], ["--out", "input"]),
    # inspect
    ("inspect-experts", ["inspect", "--depth", "16", "--experts", "5"], ["--experts 5", "4096"]),
    ("inspect-depth", ["inspect", "--depth", "0"], ["depth 0"]),
    ("inspect-neither", ["inspect"], ["exactly one"]),
    ("inspect-ratio", ["inspect", "--depth", "16", "--token-ratio", "0"], ["--token-ratio 0"]),
    ("inspect-text", ["inspect", "--ckpt", "{bad}/text.pt"], ["text.pt", "not a PyTorch checkpoint"]),
    ("inspect-stored-ratio", ["inspect", "--ckpt", "{bad}/ratio.pt"], ["ratio.pt", "token ratio 2.0"]),
    # engines (every error here comes before TensorRT is loaded)
    ("engines-missing", ["engines", "--bundle", "{bad}/none"], ["no such bundle"]),
    ("engines-file", ["engines", "--bundle", "{afile}"], ["is a file"]),
    ("engines-edited", ["engines", "--bundle", "{bad}/edited"], ["'batch'"]),
    ("engines-truncated", ["engines", "--bundle", "{bad}/truncated"], ["step_4.onnx"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_matrix(case, W, monkeypatch):
    name, argv, needles = case[:3]
    mount = case[3] if len(case) > 3 else None
    if mount and W[mount] is None:
        pytest.skip(f"cannot mount a {'read-only' if mount == 'ro' else 'small'} tmpfs here: {W[mount + '_why']}")
    cwd = W["root"] / "cwd"
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    fill = {k: v for k, v in W.items() if isinstance(v, Path)}
    args = [a.format(**fill) for a in argv]
    before = snapshot(W["root"])
    # validate: 2 for bad usage or input (1 means a bundle failed validation); every other command: 1
    assert_one_line_error(run(*args), *needles, code=2 if args[0] == "validate" else 1)
    after = snapshot(W["root"])                   # nothing new, changed or left behind (temporary files included)
    assert {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)} == {}


def test_full_disk_writes_end_in_one_line(W, monkeypatch):
    """ENOSPC while writing (after the work): init-ckpt and sample's PNG name the target; nothing left.
    (init-ckpt's weights are the module's checkpoint: the write is under test, not the initialisation.)"""
    if W["full"] is None:
        pytest.skip(f"cannot mount a small tmpfs here: {W['full_why']}")
    import actvar_export.init
    monkeypatch.setattr(actvar_export.init, "init_checkpoint", lambda *a, **k: torch.load(W["ckpt"], weights_only=True))
    assert_one_line_error(run("init-ckpt", "--depth", 2, "--out", W["full"] / "a.pt"), "a.pt", "no space left")
    assert_one_line_error(run("sample", "--ckpt", W["ckpt"], "--classes", "1", "--sampler", "noise",
                              "--out", W["full"] / "g.png"), "g.png", "no space left")
    assert list(W["full"].iterdir()) == []


def test_force_replaces_only_a_bundle_atomically(W, tmp_path):
    """--force over a bundle: the new one takes its place, umask permissions, nothing else left beside it;
    the same checkpoint regenerated by init-ckpt has the same bytes, so the bundle validates against it."""
    out = tmp_path / "b"
    shutil.copytree(W["bundle"], out)
    before = json.loads((out / MANIFEST).read_text())["created"]
    (out / "stale").write_text("a file of the old bundle")
    mask = os.umask(0o022)
    try:
        r = run("build", "--ckpt", W["ckpt"], "--out", out, "--batch", 2, "--precision", "fp32", "--top-k", 50, "--force")
    finally:
        os.umask(mask)
    assert r.exit_code == 0, r.output
    b = Bundle.open(out)
    assert b.manifest["top_k"] == 50 and not (out / "stale").exists() and b.manifest["created"] >= before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert (out.stat().st_mode & 0o777) == 0o755


def test_bundle_of_an_older_format_is_refused_then_replaced_by_force(W, tmp_path):
    """A bundle whose manifest says an earlier format: every command refuses it with one line naming the format
    and the rebuild; `build --force` replaces it (it is a bundle build wrote), a newer format is not replaced."""
    from actvar_export.bundle import FORMAT
    out = tmp_path / "old"
    shutil.copytree(W["bundle"], out)
    m = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps(m | {"format": FORMAT - 1}))
    r = run("sample", "--bundle", out, "--out", tmp_path / "g.png")
    assert_one_line_error(r, f"format {FORMAT - 1}", "rebuild it")
    r = run("build", "--ckpt", W["ckpt"], "--out", out, "--batch", 2, "--precision", "fp32", "--force")
    assert r.exit_code == 0, r.output
    assert Bundle.open(out).manifest["format"] == FORMAT
    (out / MANIFEST).write_text(json.dumps(m | {"format": FORMAT + 1}))
    r = run("build", "--ckpt", W["ckpt"], "--out", out, "--batch", 2, "--precision", "fp32", "--force")
    assert_one_line_error(r, "is not a bundle")
    assert json.loads((out / MANIFEST).read_text())["format"] == FORMAT + 1


def test_init_ckpt_is_byte_reproducible(W, tmp_path):
    """init-ckpt in another process with the arguments of conftest's checkpoint (d2, seed 3, 16 experts,
    written by the same save_atomic in this process): the same sha256, so validate accepts the new file
    for the module's bundle, built from the other (its checkpoint check; the numerical validation of a
    bundle against these bytes is tests/test_export.py's)."""
    a = tmp_path / "a.pt"
    r = subprocess.run([sys.executable, "-m", "actvar_export", "init-ckpt", "--depth", "2", "--seed", "3", "--out", str(a)],
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert sha(a) == sha(W["ckpt"])
    Bundle.open(W["bundle"]).check_checkpoint(a)


@pytest.fixture(scope="module")
def d8(actvar_ckpt, tmp_path_factory):
    """An ActVAR d8 checkpoint; its VQVAE (the slow part of init-ckpt) is the d2 checkpoint's."""
    from actvar_export.config import ActVarConfig, ModelSpec, VarConfig
    from actvar_export.init import init_var
    spec = ModelSpec(VarConfig(8), ActVarConfig())
    p = tmp_path_factory.mktemp("d8") / "d8.pt"
    save_atomic({"model": init_var(spec, 0).state_dict(), "vae": torch.load(actvar_ckpt, weights_only=True)["vae"],
                 "actvar": spec.actvar.to_dict()}, p)
    return p


def _build_cmd(ckpt, out):
    return [sys.executable, "-m", "actvar_export", "build", "--ckpt", str(ckpt), "--out", str(out),
            "--precision", "fp32", "--force"]


def _temps(out: Path):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_signal_during_build(sig, d8, tmp_path):
    """A d8 build killed while writing its temporary directory: SIGTERM/SIGHUP clean up and exit with
    128 + signum, SIGINT (Ctrl-C) cleans up and exits with 1; after SIGKILL the directory stays, and the
    next build of the same --out removes it (but not the temporary directory of a live build) and succeeds."""
    out = tmp_path / "bundle"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # SIGINT at its default in the child (a shell's background job, e.g. a CI runner's, inherits it ignored, and
    # Python then installs no KeyboardInterrupt handler): the test is of the build's handling, not of the parent's
    proc = subprocess.Popen(_build_cmd(d8, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while not _temps(out) and proc.poll() is None and time.time() - t0 < 240:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert not out.exists()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL and _temps(out)
    elif sig == signal.SIGINT:
        assert proc.returncode == 1 and "Aborted!" in err and "Traceback" not in err, err
        assert _temps(out) == []
        return
    else:
        assert proc.returncode == 128 + sig, err
        assert f"Aborted by {sig.name}" in err and "Traceback" not in err, err
        assert _temps(out) == []
        return
    live = out.parent / f".{out.name}.{os.getpid()}.live.tmp"      # this test process is alive
    live.mkdir()
    r = subprocess.run(_build_cmd(d8, out), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert _temps(out) == [live.name]
    Bundle.open(out)


def test_sigterm_during_init_ckpt(tmp_path):
    """init-ckpt stopped while it computes: exit 128 + SIGTERM, no file and no temporary file."""
    out = tmp_path / "a.pt"
    proc = subprocess.Popen([sys.executable, "-m", "actvar_export", "init-ckpt", "--depth", "2", "--out", str(out)],
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.PIPE, text=True)
    assert "random weights" in proc.stderr.readline()       # printed once the options are checked
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, err
    assert "Aborted by SIGTERM" in err and "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_help_teaches():
    """Every option says what it does and its default (or that it is required); each command shows an
    example; the top-level help lists each command once."""
    import click
    top = run("--help").output
    for name, cmd in main.commands.items():
        assert sum(l.split()[:1] == [name] for l in top.splitlines()) == 1, (name, top)
        text = run(name, "--help").output
        assert "Example" in text, name
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.name == "help":
                continue
            assert p.help, (name, p.name)
            shown = p.required or "[default:" in p.help or "[required unless" in p.help or \
                (p.show_default and p.default is not None)
            assert shown, (name, p.name, "no default in its help")
