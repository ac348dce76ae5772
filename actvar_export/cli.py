"""`actvar-export`: a thin command line over the Python API."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .errors import ActVarError

RANDOM_WARNING = "NOTE: random weights — this is not a trained model; images will be noise-like textures."


class _Group(click.Group):
    """User errors (ActVarError) become one line on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ActVarError as e:
            raise click.ClickException(str(e)) from None


def _ints(text: str, what: str):
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ActVarError(f"invalid {what} {text!r}: expected integers separated by commas") from None


def _overrides(token_ratio, expert_ratio, active_scales):
    return {"token_ratio": token_ratio, "expert_ratio": expert_ratio,
            "active_scales": None if active_scales is None else tuple(_ints(active_scales, "active scales"))}


actvar_options = [
    click.option("--token-ratio", type=float, default=None, help="Override ρ_t, the share of tokens each ActVAR block updates (0, 1]."),
    click.option("--expert-ratio", type=float, default=None, help="Override ρ_w, the share of experts each token uses (0, 1]."),
    click.option("--active-scales", default=None, help="Override the 0-based scales with dynamic activation, e.g. '8,9'."),
]


def _apply(opts):
    def deco(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="actvar-export")
def main():
    """Compile ActVAR / VAR image generators for deployment.

    \b
    init-ckpt  make a RANDOM-weight checkpoint in the official layout (for trying things out)
    build      export per-scale ONNX step graphs + decoder + one weights file into a bundle
    validate   prove a bundle matches the PyTorch reference (teacher forcing + end to end)
    sample     generate images with the PyTorch reference, or with a bundle (--bundle)
    inspect    sizes, ActVAR settings, static top-k sizes and FLOPs of a checkpoint
    engines    parse a bundle's graphs with TensorRT (plugins for --lowering plugin) and serialize engines
    """


@main.command("init-ckpt")
@click.option("--depth", type=int, required=True, help="VAR depth: 16/20/24/30 give the official shapes; 2-4 are for tests.")
@click.option("--dense", is_flag=True, help="Plain VAR (no selector/router keys).")
@click.option("--experts", type=int, default=16, show_default=True, help="Number of FFN experts N.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def init_ckpt(depth, dense, experts, seed, out):
    """Write a RANDOM-WEIGHT checkpoint (not a trained model).

    The file holds {"model": VAR state dict in the official layout (+ ActVAR selector/router
    keys unless --dense), "actvar": settings, "vae": a full VQVAE state dict, "info": note}.
    Weights are scaled so every block changes its input substantially (no vacuous model).
    """
    from .checkpoint import save_atomic
    from .config import ActVarConfig, VarConfig
    from .init import init_checkpoint
    VarConfig(depth=depth)
    if not dense:
        ActVarConfig(num_experts=experts)
        if (256 * depth) % experts:
            raise ActVarError(f"{experts} experts do not divide the FFN hidden size {256 * depth}")
    click.echo(RANDOM_WARNING, err=True)
    t = time.time()
    ck = init_checkpoint(depth, dense=dense, experts=experts, seed=seed)
    save_atomic(ck, out)
    kind = "VAR" if dense else f"ActVAR ({experts} experts)"
    click.echo(f"wrote {out}: random-weight {kind} d{depth} + VQVAE, seed {seed} ({time.time() - t:.1f}s)")


@main.command()
@click.option("--ckpt", type=click.Path(path_type=Path), default=None, help="VAR/ActVAR checkpoint (reference generation).")
@click.option("--bundle", type=click.Path(path_type=Path), default=None, help="A bundle from `build`: generate through ONNX Runtime instead (noise sampler).")
@click.option("--providers", default=None, help="With --bundle: ONNX Runtime providers, e.g. 'cuda,cpu' (default: CUDA if available, else CPU).")
@click.option("--vae", type=click.Path(path_type=Path), default=None, help="VQVAE state dict (vae_ch160v4096z32.pth) unless the checkpoint holds one.")
@click.option("--classes", default="207,360,387,974,88,979,417,279", show_default=True, help="ImageNet class ids, comma separated.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cfg", type=float, default=1.5, show_default=True, help="Classifier-free guidance strength.")
@click.option("--top-k", type=int, default=900, show_default=True, help="0 disables.")
@click.option("--top-p", type=float, default=0.96, show_default=True, help="0 disables.")
@click.option("--sampler", type=click.Choice(["official", "noise"]), default="official", show_default=True,
              help="official: torch.multinomial stream (bit-compatible with VAR); noise: inverse CDF from seeded uniforms (reproducible across backends).")
@click.option("--more-smooth", is_flag=True, help="VAR's Gumbel smoothing (visualisation only; official sampler).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True, help="Autocast precision.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@_apply(actvar_options)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("grid.png"), show_default=True)
def sample(ckpt, bundle, providers, vae, classes, seed, cfg, top_k, top_p, sampler, more_smooth, precision, device,
           token_ratio, expert_ratio, active_scales, out):
    """Generate images and write a labelled PNG grid: with the PyTorch reference (--ckpt), or
    through ONNX Runtime from a bundle (--bundle; top-k and precision are fixed by the bundle)."""
    if (ckpt is None) == (bundle is None):
        raise ActVarError("give exactly one of --ckpt FILE (reference) or --bundle DIR (ONNX Runtime)")
    if bundle is not None:
        ctx = click.get_current_context()
        given = lambda name: ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        if sampler != "noise" and given("sampler") or more_smooth:
            raise ActVarError("a bundle implements the noise sampler only (drop --sampler official / --more-smooth)")
        for name in ("vae", "precision", "device", "token_ratio", "expert_ratio", "active_scales"):
            if given(name):
                raise ActVarError(f"--{name.replace('_', '-')} applies to --ckpt only: a bundle fixes it at build time")
        return _sample_bundle(bundle, providers, classes, seed, cfg, top_k if given("top_k") else None, top_p, out)
    import torch
    from tqdm import tqdm
    from .checkpoint import build_models, load_checkpoint
    from .config import NUM_SCALES, PATCH_NUMS, TOTAL_TOKENS
    from .generate import SampleSettings, generate
    from .images import save_grid
    from .sampling import noise_for
    settings = SampleSettings(cfg=cfg, top_k=top_k, top_p=top_p, sampler=sampler, more_smooth=more_smooth)
    labels = _ints(classes, "classes")
    if not labels or any(not 0 <= c < 1000 for c in labels):
        raise ActVarError(f"invalid classes {classes!r}: ImageNet ids are 0..999")
    dev = _device(device)
    ck = load_checkpoint(ckpt, vae, _overrides(token_ratio, expert_ratio, active_scales))
    random_note = ck.info is not None
    model, v = build_models(ck, dev)
    label_B = torch.tensor(labels, device=dev)
    u = noise_for(len(labels), seed, TOTAL_TOKENS) if sampler == "noise" else None
    bar = tqdm(total=NUM_SCALES, desc="scales", unit="scale", file=sys.stderr)
    t = time.time()
    res = generate(model, v, label_B, settings, seed=seed, u_BL=u, precision=precision, decode=False,
                   progress=lambda si: (bar.set_postfix_str(f"{PATCH_NUMS[si]}x{PATCH_NUMS[si]}"), bar.update(1)))
    bar.close()
    click.echo(f"decoding {len(labels)} images with the VQVAE ...", err=True)
    with torch.no_grad():
        res.images_B3HW = v.fhat_to_img(res.f_hat).float()
    kind = f"ActVAR-d{ck.spec.var.depth}" if ck.spec.is_actvar else f"VAR-d{ck.spec.var.depth}"
    title = f"{kind} seed={seed} cfg={cfg} top_k={top_k} top_p={top_p} {sampler}" + (" [RANDOM WEIGHTS]" if random_note else "")
    save_grid(res.images_B3HW, out, labels=[f"class {c}" for c in labels], title=title)
    click.echo(f"wrote {out}: {len(labels)} images, {kind}, {time.time() - t:.1f}s")
    if random_note:
        click.echo(RANDOM_WARNING, err=True)


def _providers(text):
    if text is None:
        return None
    names = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
    out = []
    for t in text.split(","):
        t = t.strip().lower()
        if t not in names:
            raise ActVarError(f"unknown provider {t!r}: use cuda, cpu or tensorrt")
        out.append(names[t])
    return out


def _sample_bundle(bundle, providers, classes, seed, cfg, top_k, top_p, out):
    import numpy as np
    import torch
    from tqdm import tqdm
    from .bundle import Bundle
    from .config import NUM_SCALES, TOTAL_TOKENS
    from .images import save_grid
    from .runtime.loop import run_bundle
    from .runtime.ort_backend import OrtBackend
    from .sampling import noise_for
    b = Bundle.open(bundle, show_progress=True)
    if top_k is not None and top_k != b.manifest["top_k"]:
        raise ActVarError(f"the bundle was built with top-k {b.manifest['top_k']} (static in its graphs); "
                          f"rebuild with --top-k {top_k}")
    labels = _ints(classes, "classes")
    if not labels or any(not 0 <= c < 1000 for c in labels):
        raise ActVarError(f"invalid classes {classes!r}: ImageNet ids are 0..999")
    B = b.batch
    images, t = [], time.time()
    backend = OrtBackend(b, _providers(providers))
    chunks = [labels[i:i + B] for i in range(0, len(labels), B)]
    bar = tqdm(total=NUM_SCALES * len(chunks), desc="scales", unit="scale", file=sys.stderr)
    for ci, chunk in enumerate(chunks):
        lab = np.array(chunk + [chunk[-1]] * (B - len(chunk)), np.int64)   # pad to the bundle's batch
        u = noise_for(B, seed + ci, TOTAL_TOKENS).numpy()
        img, _, _, _ = run_bundle(backend, lab, u, cfg, top_p, progress=lambda si: bar.update(1))
        images.append(torch.from_numpy(img[:len(chunk)]))
    bar.close()
    m = b.manifest
    title = (f"bundle d{m['model']['depth']} {m['precision']} {m['lowering']} seed={seed} cfg={cfg} "
             f"top_k={m['top_k']} top_p={top_p} noise [{', '.join(backend.provider_names)}]")
    save_grid(torch.cat(images), out, labels=[f"class {c}" for c in labels], title=title)
    click.echo(f"wrote {out}: {len(labels)} images through ONNX Runtime ({', '.join(backend.provider_names)}), {time.time() - t:.1f}s")


@main.command()
@click.option("--ckpt", type=click.Path(path_type=Path), required=True, help="VAR/ActVAR checkpoint.")
@click.option("--vae", type=click.Path(path_type=Path), default=None, help="VQVAE state dict unless the checkpoint holds one.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Bundle directory to write.")
@click.option("--batch", type=int, default=1, show_default=True, help="Images per run (CFG doubles the sequences inside).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp16", show_default=True,
              help="Precision written into the graphs (matmuls; norms, softmax, sampler and f_hat stay fp32).")
@click.option("--lowering", type=click.Choice(["portable", "plugin"]), default="portable", show_default=True,
              help="portable: standard ONNX ops only; plugin: ActVarTokenScatter / ActVarExpertFFN nodes for TensorRT plugins.")
@click.option("--top-k", type=int, default=900, show_default=True, help="Static top-k of the graphs' sampler (1..3840).")
@_apply(actvar_options)
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
def build(ckpt, vae, out, batch, precision, lowering, top_k, token_ratio, expert_ratio, active_scales, force):
    """Export a deploy bundle: one ONNX step graph per scale (static shapes for --batch, fixed
    K_t/K_w, KV cache as one packed tensor, CFG + noise sampler + f_hat update + next input inside),
    the VQVAE decoder graph, weights.bin (every weight once, shared by all graphs) and manifest.json
    (config, static sizes, versions, sha256 of every file and of the checkpoint). Written to a
    temporary directory and renamed when complete."""
    from .bundle import build_bundle
    t = time.time()
    p = build_bundle(ckpt, out, vae=vae, batch=batch, precision=precision, lowering=lowering, top_k=top_k,
                     force=force, overrides=_overrides(token_ratio, expert_ratio, active_scales))
    size = sum(f.stat().st_size for f in p.iterdir())
    click.echo(f"wrote {p}: 10 step graphs + decoder, {size / 1e6:.1f} MB, {precision}, {lowering}, batch {batch} ({time.time() - t:.1f}s)")


@main.command()
@click.option("--bundle", type=click.Path(path_type=Path), required=True)
@click.option("--ckpt", type=click.Path(path_type=Path), required=True, help="The checkpoint the bundle was built from.")
@click.option("--vae", type=click.Path(path_type=Path), default=None)
@click.option("--classes", default=None, help="Class ids (as many as the bundle's batch; default: 0, 1, ...).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the uniforms u fed to both sides.")
@click.option("--cfg", type=float, default=1.5, show_default=True)
@click.option("--top-p", type=float, default=0.96, show_default=True)
@click.option("--providers", default=None, help="ONNX Runtime providers, e.g. 'cpu' or 'cuda,cpu'.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the full report as JSON.")
@click.option("--grid", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write reference vs bundle images side by side.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write report.json, report.md, errors.png, grid.png and polygraphy/ (per-scale inputs and reference outputs) here.")
def validate(bundle, ckpt, vae, classes, seed, cfg, top_p, providers, json_out, grid, report_dir):
    """Prove a bundle matches the PyTorch reference (rules: docs/validation.md). Per scale, Polygraphy
    compares the bundle graph with the reference on identical inputs, the reference taking the bundle's
    decisions (teacher forcing); continuous outputs within tolerances derived from the precision, each
    differing token/expert/id explained only by its own margin, explained flips capped per scale; end to
    end, token agreement and image PSNR thresholds. Exit 0 pass, 1 fail, 2 bad usage or input."""
    from .validate import ValidationError
    try:
        rep, backend, b, labels = _validate_run(bundle, ckpt, vae, classes, seed, cfg, top_p, providers, report_dir)
    except ValidationError:
        raise
    except ActVarError as e:
        raise _BadInput(str(e)) from None
    click.echo(f"bundle {bundle} ({b.manifest['precision']}, {b.manifest['lowering']}, batch {b.batch}) on {', '.join(backend.provider_names)}")
    click.echo(rep.table())
    if json_out:
        from .fsutil import write_json_atomic
        write_json_atomic(json_out, rep.to_dict())
    if grid and rep.images:
        import torch
        from .images import save_grid
        ref, got = torch.from_numpy(rep.images["reference"]), torch.from_numpy(rep.images["bundle"])
        diff = ((got - ref).abs() * 10).clamp(0, 1)
        save_grid(torch.cat([ref, got, diff]), grid, cols=len(labels),
                  labels=[f"reference {c}" for c in labels] + [f"bundle {c}" for c in labels] + [f"|diff|x10 {c}" for c in labels],
                  title=f"validate: PSNR {rep.psnr_db:.1f} dB, token agreement {100 * rep.token_agreement:.2f}%")
        click.echo(f"wrote {grid}")
    if report_dir:
        from .validation.report import polygraphy_command, write_report
        header = [f"- bundle: `{bundle}` ({b.manifest['precision']}, {b.manifest['lowering']}, batch {b.batch}, top-k {b.manifest['top_k']})",
                  f"- providers: {', '.join(backend.provider_names)}; classes {labels}, seed {seed}, cfg {cfg}, top-p {top_p}",
                  f"- command: `actvar-export {' '.join(sys.argv[1:])}`"]
        write_report(report_dir, rep, bundle, header)
        click.echo(f"wrote {report_dir}; re-check the last scale with:\n  {polygraphy_command(bundle, report_dir, 9, rep)}")
    if rep.failures:
        click.echo("\n".join("FAIL " + f for f in rep.failures), err=True)
        raise ValidationError(f"{len(rep.failures)} check(s) failed: {rep.failures[0]}")
    click.echo("all checks passed")


class _BadInput(click.ClickException):
    exit_code = 2


def _validate_run(bundle, ckpt, vae, classes, seed, cfg, top_p, providers, report_dir):
    import sys as _sys
    from tqdm import tqdm
    from .bundle import Bundle
    from .checkpoint import build_models, load_checkpoint
    from .generate import SampleSettings
    from .runtime.ort_backend import OrtBackend
    from .validate import validate_bundle
    if report_dir:
        from .validation.report import check_target
        check_target(report_dir)
    b = Bundle.open(bundle, show_progress=True)
    b.check_checkpoint(ckpt)
    m = b.manifest
    ov = m["actvar"] and {k: m["actvar"][k] for k in ("token_ratio", "expert_ratio")} | {"active_scales": tuple(m["actvar"]["active_scales"])}
    model, v = build_models(load_checkpoint(ckpt, vae, ov or None))
    labels = _ints(classes, "classes") if classes else [i % 1000 for i in range(b.batch)]
    if len(labels) != b.batch or any(not 0 <= c < 1000 for c in labels):
        raise ActVarError(f"--classes: the bundle was built for batch {b.batch}: give {b.batch} ImageNet ids (0..999)")
    settings = SampleSettings(cfg=cfg, top_k=m["top_k"], top_p=top_p, sampler="noise")
    backend = OrtBackend(b, _providers(providers))
    bar = tqdm(total=10, desc="teacher forcing", unit="scale", file=_sys.stderr)
    rep = validate_bundle(backend, model, v, labels, seed, settings, m["precision"], progress=lambda si: bar.update(1))
    bar.close()
    return rep, backend, b, labels


def _device(device: str):
    import torch
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ActVarError(f"device {device!r} requested but CUDA is not available here")
    return dev


@main.command()
@click.option("--ckpt", type=click.Path(path_type=Path), default=None, help="Checkpoint to inspect.")
@click.option("--depth", type=int, default=None, help="Without --ckpt: an official-shape model of this depth (analytic).")
@click.option("--experts", type=int, default=16, show_default=True, help="With --depth: number of experts.")
@_apply(actvar_options)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(ckpt, depth, experts, token_ratio, expert_ratio, active_scales, as_json):
    """Depth, width, parameters, ActVAR settings, static top-k sizes and analytic FLOPs per image
    per scale (with CFG) for dense VAR and ActVAR, with the saving against the paper's figure."""
    from .config import ActVarConfig, ModelSpec, VarConfig
    from .flops import report
    ov = _overrides(token_ratio, expert_ratio, active_scales)
    if (ckpt is None) == (depth is None):
        raise ActVarError("give exactly one of --ckpt FILE or --depth N")
    if ckpt is not None:
        from .checkpoint import load_checkpoint
        ck = load_checkpoint(ckpt, None, ov)
        spec = ck.spec
        n_params = sum(v.numel() for k, v in ck.var_sd.items() if k not in ("lvl_1L", "attn_bias_for_masking")
                       and not k.endswith("zero_k_bias"))
        random_w = ck.info is not None
    else:
        act = ActVarConfig.from_dict({"num_experts": experts, **{k: v for k, v in ov.items() if v is not None}})
        spec = ModelSpec(VarConfig(depth), act)
        from .checkpoint import expected_shapes
        import math
        n_params = sum(math.prod(s) for k, s in expected_shapes(spec).items()
                       if k not in ("lvl_1L", "attn_bias_for_masking") and not k.endswith("zero_k_bias"))
        random_w = False
    act = spec.actvar or ActVarConfig()
    r = report(spec.var, act)
    info = {"depth": spec.var.depth, "width": spec.var.width, "heads": spec.var.heads, "parameters": n_params,
            "actvar": spec.actvar.to_dict() if spec.actvar else None,
            "checkpoint": "ActVAR" if spec.is_actvar else "dense VAR (ActVAR figures use the default settings)",
            "random_weights": random_w, "static_sizes": act.static_sizes(), "flops": r}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"VAR-d{spec.var.depth}: width {spec.var.width}, {spec.var.heads} heads, {n_params:,} parameters"
               + ("  [RANDOM WEIGHTS]" if random_w else ""))
    click.echo(f"checkpoint: {info['checkpoint']}")
    click.echo(f"ActVAR: experts N={act.num_experts}, expert ratio {act.expert_ratio} -> K_w={act.k_w}, "
               f"token ratio {act.token_ratio}, active scales {list(act.active_scales)}")
    click.echo(f"{'scale':>5} {'pn':>3} {'L':>4} {'K_t':>4} {'cache':>5} {'dense GFLOP':>12} {'ActVAR GFLOP':>13}")
    for row, kt, cl in zip(r["per_scale"], act.static_sizes()["k_t"], act.static_sizes()["cache_len"]):
        click.echo(f"{row['scale']:>5} {row['pn']:>3} {row['pn'] ** 2:>4} {kt:>4} {cl:>5} "
                   f"{row['dense_gflop']:>12.2f} {row['actvar_gflop']:>13.2f}")
    paper = r["paper_saving_percent"]
    click.echo(f"transformer per image with CFG: dense {r['dense_tflop']:.3f} TFLOP, ActVAR {r['actvar_tflop']:.3f} TFLOP; "
               f"VQVAE decoder {r['vae_decoder_tflop']:.3f} TFLOP")
    click.echo(f"ActVAR saving: {r['saving_percent']:.1f}% (paper: {f'{paper}%' if paper else 'n/a'}; "
               f"see docs/flops.md for the counting)")


@main.command()
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="A bundle from `build`.")
@click.option("--graphs", default=None, help="Comma-separated graph names (default: all), e.g. 'step_0,step_9,decoder'.")
def engines(bundle, graphs):
    """Parse each graph of a bundle with TensorRT (`tensorrt` if installed, else TensorRT-RTX), check
    that every ActVarTokenScatter / ActVarExpertFFN node became one of this package's plugin layers and
    that inputs/outputs have the manifest's dtypes, build strongly typed serialized engines and write
    <graph>.engine files + engines.json into the bundle (manifest.json is not modified). The engines
    are built only: nothing here runs them."""
    from .trt.engines import ENGINES_JSON, build_engines
    t = time.time()
    names = [g for g in graphs.split(",") if g.strip()] if graphs is not None else None
    res = build_engines(bundle, names=names)
    total = sum(g["bytes"] for g in res["graphs"].values())
    plugins = sum(sum(g["plugin_layers"].values()) for g in res["graphs"].values())
    click.echo(f"wrote {len(res['graphs'])} engine(s) + {ENGINES_JSON} into {bundle}: {total / 1e6:.1f} MB, "
               f"{res['tensorrt']['module']} {res['tensorrt']['version']}, {res['lowering']} lowering, "
               f"{plugins} plugin layer(s) ({time.time() - t:.1f}s); built only, not run")


if __name__ == "__main__":
    main()
