"""`actvar-export`: a thin command line over the Python API."""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import click

from . import options as opt
from .errors import ActVarError
from .interrupt import Terminated, signals_raise

RANDOM_WARNING = "NOTE: random weights — this is not a trained model; images will be noise-like textures."


class _Group(click.Group):
    """User errors (ActVarError) and file system faults become one line on stderr and exit code 1,
    never a traceback; SIGTERM/SIGHUP run the cleanup and exit with 128 + signum."""

    def invoke(self, ctx):
        try:
            with signals_raise():
                return super().invoke(ctx)
        except ActVarError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(f"{e.filename or 'a file'}: {e.strerror or e}") from None
        except Terminated as e:
            click.echo(f"Aborted by {signal.Signals(e.signum).name}.", err=True)
            ctx.exit(128 + e.signum)


actvar_options = [
    click.option("--token-ratio", type=float, default=None, help="Override ρ_t, the share of tokens each ActVAR block updates, in (0, 1]  [default: the checkpoint's]"),
    click.option("--expert-ratio", type=float, default=None, help="Override ρ_w, the share of experts each token uses, in (0, 1]  [default: the checkpoint's]"),
    click.option("--active-scales", default=None, help="Override the 0-based scales with dynamic activation, e.g. '8,9'  [default: the checkpoint's]"),
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
    Example (a random-weight d4 model, its bundle, proof and images):
      actvar-export init-ckpt --depth 4 --out demo/d4.pt
      actvar-export build --ckpt demo/d4.pt --out demo/bundle --batch 4 --precision fp32
      actvar-export validate --bundle demo/bundle --ckpt demo/d4.pt
      actvar-export sample --bundle demo/bundle --out demo/grid.png
    """


@main.command("init-ckpt")
@click.option("--depth", type=int, required=True, help="VAR depth: 16/20/24/30 give the official shapes; 2-4 are for tests.")
@click.option("--dense", is_flag=True, help="Plain VAR (no selector/router keys)  [default: ActVAR]")
@click.option("--experts", type=int, default=16, show_default=True, help="Number of FFN experts N; must divide 256·depth.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights: the same arguments give the same file bytes.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint file to write (temporary file + rename).")
def init_ckpt(depth, dense, experts, seed, out):
    """Write a RANDOM-WEIGHT checkpoint (not a trained model).

    The file holds {"model": VAR state dict in the official layout (+ ActVAR selector/router
    keys unless --dense), "actvar": settings, "vae": a full VQVAE state dict, "info": note}.
    Weights are scaled so every block changes its input substantially (no vacuous model).

    \b
    Example:
      actvar-export init-ckpt --depth 4 --seed 0 --out demo/d4.pt
    """
    from .checkpoint import save_atomic
    from .init import init_checkpoint
    opt.depth(depth)
    if not dense:
        opt.experts(depth, experts)
    opt.output_file(out, "--out")
    click.echo(RANDOM_WARNING, err=True)
    t = time.time()
    ck = init_checkpoint(depth, dense=dense, experts=experts, seed=seed)
    save_atomic(ck, out)
    kind = "VAR" if dense else f"ActVAR ({experts} experts)"
    click.echo(f"wrote {out}: random-weight {kind} d{depth} + VQVAE, seed {seed} ({time.time() - t:.1f}s)")


@main.command()
@click.option("--ckpt", type=click.Path(path_type=Path), default=None, help="VAR/ActVAR checkpoint (reference generation)  [required unless --bundle]")
@click.option("--bundle", type=click.Path(path_type=Path), default=None, help="A bundle directory from `build`: generate through ONNX Runtime instead (noise sampler)  [required unless --ckpt]")
@click.option("--providers", default=None, help="With --bundle: ONNX Runtime providers, e.g. 'cuda,cpu'  [default: CUDA if available, else CPU]")
@click.option("--vae", type=click.Path(path_type=Path), default=None, help="VQVAE state dict (vae_ch160v4096z32.pth)  [default: the checkpoint's own]")
@click.option("--classes", default="207,360,387,974,88,979,417,279", show_default=True, help="ImageNet class ids (0..999), comma separated.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (0 .. 2^64-1): of torch's generator (official sampler) or of the canonical uniforms u (noise sampler; image i of the request gets its own u, whatever the batching).")
@click.option("--cfg", type=float, default=1.5, show_default=True, help="Classifier-free guidance strength (finite, >= 0).")
@click.option("--top-k", type=int, default=None, help="Top-k of the sampler; 0 disables (--ckpt only)  [default: 900 with --ckpt, the bundle's static top-k with --bundle]")
@click.option("--top-p", type=float, default=0.96, show_default=True, help="Top-p in [0, 1]; 0 disables.")
@click.option("--sampler", type=click.Choice(["official", "noise"]), default=None,
              help="official: torch.multinomial stream (bit-compatible with VAR); noise: inverse CDF from seeded uniforms "
                   "(reproducible across backends)  [default: official with --ckpt, noise with --bundle (its only sampler)]")
@click.option("--more-smooth", is_flag=True, help="VAR's Gumbel smoothing (visualisation only; official sampler)  [default: off]")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True, help="Autocast precision (--ckpt only).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (--ckpt only).")
@_apply(actvar_options)
@click.option("--out", type=click.Path(path_type=Path), default=Path("grid.png"), show_default=True, help="PNG grid to write.")
@click.option("--raw", type=click.Path(path_type=Path), default=None, help="Also write the images as one uint8 NHWC .npy  [default: none]")
def sample(ckpt, bundle, providers, vae, classes, seed, cfg, top_k, top_p, sampler, more_smooth, precision, device,
           token_ratio, expert_ratio, active_scales, out, raw):
    """Generate images and write a labelled PNG grid: with the PyTorch reference (--ckpt), or
    through ONNX Runtime from a bundle (--bundle; top-k and precision are fixed by the bundle).

    \b
    Examples:
      actvar-export sample --ckpt demo/d4.pt --classes 1,2 --sampler noise --out ref.png
      actvar-export sample --bundle demo/bundle --classes 1,2,3,4 --out grid.png
    """
    from .sampling import check_seed
    check_seed(seed)
    if (ckpt is None) == (bundle is None):
        raise ActVarError("give exactly one of --ckpt FILE (reference) or --bundle DIR (ONNX Runtime)")
    opt.cfg(cfg)
    opt.top_p(top_p)
    labels = opt.classes(classes)
    opt.output_file(out, "--out", inputs=(ckpt, vae, bundle))
    if raw is not None:
        opt.output_file(raw, "--raw", inputs=(ckpt, vae, bundle))
    if bundle is not None:
        ctx = click.get_current_context()
        given = lambda name: ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        if sampler not in (None, "noise") or more_smooth:
            raise ActVarError("a bundle implements the noise sampler only (drop --sampler official / --more-smooth)")
        for name in ("vae", "precision", "device", "token_ratio", "expert_ratio", "active_scales"):
            if given(name):
                raise ActVarError(f"--{name.replace('_', '-')} applies to --ckpt only: a bundle fixes it at build time")
        return _sample_bundle(bundle, opt.runtime_device(providers), labels, seed, cfg, top_k, top_p, out, raw)
    top_k = opt.top_k_reference(900 if top_k is None else top_k)
    sampler = sampler or "official"
    dev = opt.device(device)
    ov = opt.actvar_overrides(token_ratio, expert_ratio, active_scales)
    import torch
    from tqdm import tqdm
    from .checkpoint import build_models, load_checkpoint
    from .config import NUM_SCALES, PATCH_NUMS, TOTAL_TOKENS
    from .generate import SampleSettings, generate
    from .images import save_grid, save_raw
    from .sampling import noise_for
    settings = SampleSettings(cfg=cfg, top_k=top_k, top_p=top_p, sampler=sampler, more_smooth=more_smooth)
    ck = load_checkpoint(ckpt, vae, ov)
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
    if raw:
        save_raw(res.images_B3HW, raw)
    click.echo(f"wrote {out}{f' and {raw}' if raw else ''}: {len(labels)} images, {kind}, {time.time() - t:.1f}s")
    if random_note:
        click.echo(RANDOM_WARNING, err=True)


def _sample_bundle(bundle, device, labels, seed, cfg, top_k, top_p, out, raw=None):
    from tqdm import tqdm
    from .bundle import Bundle
    from .config import NUM_SCALES
    from .images import save_grid, save_raw
    from .serving.generator import bundle_generator, check_job
    b = Bundle.open(bundle, verify=False)
    opt.top_k_bundle(top_k, b.manifest["top_k"])
    b.verify(show_progress=True)
    gen = bundle_generator(b, device, log=lambda line: click.echo(line, err=True))
    t = time.time()
    bar = tqdm(total=NUM_SCALES * -(-len(labels) // gen.batch), desc="scales", unit="scale", file=sys.stderr)
    # the path every serving model takes: image i of the request gets u row i, whatever the packing
    images = gen.run([check_job(labels, seed, cfg, top_p)], progress=lambda si: bar.update(1))[0]
    bar.close()
    m = b.manifest
    title = (f"bundle d{m['model']['depth']} {m['precision']} {m['lowering']} seed={seed} cfg={cfg} "
             f"top_k={m['top_k']} top_p={top_p} noise [{', '.join(gen.backend.provider_names)}]")
    save_grid(images, out, labels=[f"class {c}" for c in labels], title=title)
    if raw:
        save_raw(images, raw)
    click.echo(f"wrote {out}{f' and {raw}' if raw else ''}: {len(labels)} images through {gen.name}, {time.time() - t:.1f}s")


@main.command()
@click.option("--ckpt", type=click.Path(path_type=Path), required=True, help="VAR/ActVAR checkpoint.")
@click.option("--vae", type=click.Path(path_type=Path), default=None, help="VQVAE state dict  [default: the checkpoint's own]")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle directory to write (a new one, or a bundle with --force).")
@click.option("--batch", type=int, default=1, show_default=True, help="Images per run (CFG doubles the sequences inside).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp16", show_default=True,
              help="Precision written into the graphs (matmuls; norms, softmax, sampler and f_hat stay fp32).")
@click.option("--lowering", type=click.Choice(["portable", "plugin"]), default="portable", show_default=True,
              help="portable: standard ONNX ops only; plugin: ActVarTokenScatter / ActVarExpertFFN nodes for TensorRT plugins.")
@click.option("--top-k", type=int, default=900, show_default=True, help="Static top-k of the graphs' sampler (1..3840).")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="onnxruntime: attention as com.microsoft.MultiHeadAttention (fp16/fp32); tensorrt: standard ops only.")
@_apply(actvar_options)
@click.option("--force", is_flag=True, help="Replace an existing bundle (only a bundle, never a directory holding an input)  [default: off]")
def build(ckpt, vae, out, batch, precision, lowering, top_k, target, token_ratio, expert_ratio, active_scales, force):
    """Export a deploy bundle: one ONNX step graph per scale (static shapes for --batch, fixed
    K_t/K_w, the KV cache in and out per block, CFG + noise sampler + f_hat update + next input inside),
    the VQVAE decoder graph, weights.bin (every weight once, shared by all graphs) and manifest.json
    (config, static sizes, versions, sha256 of every file and of the checkpoint). Written to a
    temporary directory and renamed when complete.

    \b
    Example:
      actvar-export build --ckpt demo/d4.pt --out demo/bundle --batch 4 --precision fp32
    """
    from .bundle import build_bundle
    t = time.time()
    p = build_bundle(ckpt, out, vae=vae, batch=batch, precision=precision, lowering=lowering, top_k=top_k,
                     target=target, force=force, overrides=opt.actvar_overrides(token_ratio, expert_ratio, active_scales))
    size = sum(f.stat().st_size for f in p.iterdir())
    click.echo(f"wrote {p}: 10 step graphs + decoder, {size / 1e6:.1f} MB, {precision}, {lowering}, batch {batch} ({time.time() - t:.1f}s)")


@main.command()
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="A bundle directory from `build`.")
@click.option("--ckpt", type=click.Path(path_type=Path), required=True, help="The checkpoint the bundle was built from.")
@click.option("--vae", type=click.Path(path_type=Path), default=None, help="VQVAE state dict  [default: the checkpoint's own]")
@click.option("--classes", default=None, help="Class ids, as many as the bundle's batch  [default: 0, 1, ...]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the uniforms u fed to both sides.")
@click.option("--cfg", type=float, default=1.5, show_default=True, help="Classifier-free guidance strength (finite, >= 0).")
@click.option("--top-p", type=float, default=0.96, show_default=True, help="Top-p in [0, 1]; 0 disables.")
@click.option("--providers", default=None, help="cuda or cpu ('cuda,cpu' accepted)  [default: CUDA where ONNX Runtime and torch see one, else CPU]")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the full report as JSON  [default: none]")
@click.option("--grid", type=click.Path(path_type=Path), default=None, help="Write reference vs bundle images side by side (PNG)  [default: none]")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=None,
              help="Write report.json, report.md, errors.png, grid.png and polygraphy/ (per-scale inputs and reference outputs) here  [default: none]")
def validate(bundle, ckpt, vae, classes, seed, cfg, top_p, providers, json_out, grid, report_dir):
    """Prove a bundle matches the PyTorch reference (rules: docs/validation.md). Per scale, Polygraphy
    compares the bundle graph with the reference on identical inputs, the reference taking the bundle's
    decisions (teacher forcing); continuous outputs within tolerances derived from the precision, each
    differing token/expert/id explained only by its own margin, explained flips capped per scale; end to
    end, token agreement and image PSNR thresholds. Exit 0 pass, 1 fail, 2 bad usage or input.

    \b
    Example:
      actvar-export validate --bundle demo/bundle --ckpt demo/d4.pt --grid demo/compare.png --report demo/report
    """
    from .validate import ValidationError
    try:
        rep, backend, b, labels = _validate_run(bundle, ckpt, vae, classes, seed, cfg, top_p, providers,
                                                json_out, grid, report_dir)
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
    """Bad usage or input of `validate` (exit 2; 1 means the bundle failed validation)."""
    exit_code = 2


def _validate_run(bundle, ckpt, vae, classes, seed, cfg, top_p, providers, json_out, grid, report_dir):
    opt.cfg(cfg)
    opt.top_p(top_p)
    for path, option in ((json_out, "--json"), (grid, "--grid")):
        if path is not None:
            opt.output_file(path, option, inputs=(bundle, ckpt, vae))
    device = opt.runtime_device(providers)
    from .sampling import check_seed
    check_seed(seed)
    from tqdm import tqdm
    from .bundle import Bundle
    from .checkpoint import build_models, load_checkpoint
    from .generate import SampleSettings
    from .runtime.ort_runtime import Runtime
    from .validate import validate_bundle
    if report_dir:
        from .validation.report import check_target
        check_target(report_dir)
    b = Bundle.open(bundle, verify=False)
    labels = opt.classes(classes, b.batch) if classes is not None else [i % 1000 for i in range(b.batch)]
    b.verify(show_progress=True)
    b.check_checkpoint(ckpt)
    backend = Runtime(b, device)
    m = b.manifest
    ov = m["actvar"] and {k: m["actvar"][k] for k in ("token_ratio", "expert_ratio")} | {"active_scales": tuple(m["actvar"]["active_scales"])}
    model, v = build_models(load_checkpoint(ckpt, vae, ov or None))
    settings = SampleSettings(cfg=cfg, top_k=m["top_k"], top_p=top_p, sampler="noise")
    bar = tqdm(total=10, desc="teacher forcing", unit="scale", file=sys.stderr)
    rep = validate_bundle(backend, model, v, labels, seed, settings, m["precision"], progress=lambda si: bar.update(1))
    bar.close()
    return rep, backend, b, labels


@main.command()
@click.option("--ckpt", type=click.Path(path_type=Path), default=None, help="Checkpoint to inspect  [required unless --depth]")
@click.option("--depth", type=int, default=None, help="Without --ckpt: an official-shape model of this depth (analytic)  [required unless --ckpt]")
@click.option("--experts", type=int, default=16, show_default=True, help="With --depth: number of experts; must divide 256·depth.")
@_apply(actvar_options)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table  [default: table]")
def inspect(ckpt, depth, experts, token_ratio, expert_ratio, active_scales, as_json):
    """Depth, width, parameters, ActVAR settings, static top-k sizes and analytic FLOPs per image
    per scale (with CFG) for dense VAR and ActVAR, with the saving against the paper's figure.

    \b
    Examples:
      actvar-export inspect --depth 30
      actvar-export inspect --ckpt demo/d4.pt --json
    """
    from .config import ActVarConfig, ModelSpec, VarConfig
    from .flops import report
    ov = opt.actvar_overrides(token_ratio, expert_ratio, active_scales)
    if (ckpt is None) == (depth is None):
        raise ActVarError("give exactly one of --ckpt FILE or --depth N")
    if depth is not None:
        opt.experts(depth, experts)
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
@click.option("--graphs", default=None, help="Comma-separated graph names, e.g. 'step_0,step_9,decoder'  [default: all]")
def engines(bundle, graphs):
    """Parse each graph of a bundle with TensorRT (`tensorrt` if installed, else TensorRT-RTX), check
    that every ActVarTokenScatter / ActVarExpertFFN node became a plugin layer of libactvar_trt_plugins.so
    (plugin bundles; ACTVAR_TRT_PLUGIN_LIB or build/plugins/trt/) and
    that inputs/outputs have the manifest's dtypes, build strongly typed serialized engines and write
    <graph>.engine files + engines.json into the bundle (manifest.json is not modified). The engines
    are built only: nothing here runs them.

    \b
    Example:
      actvar-export engines --bundle demo/bundle --graphs step_0,decoder
    """
    from .trt.engines import ENGINES_JSON, build_engines
    t = time.time()
    names = [g for g in graphs.split(",") if g.strip()] if graphs is not None else None
    res = build_engines(bundle, names=names)
    total = sum(g["bytes"] for g in res["graphs"].values())
    plugins = sum(sum(g["plugin_layers"].values()) for g in res["graphs"].values())
    click.echo(f"wrote {len(res['graphs'])} engine(s) + {ENGINES_JSON} into {bundle}: {total / 1e6:.1f} MB, "
               f"{res['tensorrt']['module']} {res['tensorrt']['version']}, {res['lowering']} lowering, "
               f"{plugins} plugin layer(s) ({time.time() - t:.1f}s); built only, not run")


@main.command()
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="A bundle from `build`.")
@click.option("--ckpt", type=click.Path(path_type=Path), default=None, help="Its checkpoint: adds the eager PyTorch reference (autocast = the bundle's precision) and the ratios  [default: none]")
@click.option("--iters", type=click.IntRange(min=1), default=10, show_default=True, help="Timed runs of each side.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Untimed runs first (CUDA graphs are captured here).")
@click.option("--providers", default=None, help="cuda or cpu  [default: CUDA where ONNX Runtime and torch see one, else CPU]")
@click.option("--no-cuda-graphs", is_flag=True, help="Run every step without a CUDA graph  [default: a CUDA graph per step where ONNX Runtime captures it]")
@click.option("--profile", type=click.Path(file_okay=False, path_type=Path), default=None, help="Also profile two generations (no CUDA graphs) with ONNX Runtime's profiler into this directory; time per operator type  [default: off]")
@click.option("--check-ids", is_flag=True, help="Also generate without CUDA graphs or bound buffers and compare the ids  [default: off]")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the full result as JSON  [default: none]")
def bench(bundle, ckpt, iters, warmup, providers, no_cuda_graphs, profile, check_ids, json_out):
    """Latency per batch, images/s, time per scale and peak device memory of a bundle on the runtime
    (weights once on the device, one arena, bound buffers, CUDA graphs); with --ckpt the eager reference
    in the same process first, and the ratios.

    \b
    Example:
      actvar-export bench --bundle demo/bundle --ckpt demo/d4.pt --iters 5 --json demo/bench.json
    """
    device = opt.runtime_device(providers)
    if json_out is not None:
        opt.output_file(json_out, "--json", inputs=(bundle, ckpt))
    from .bench import bench_bundle, table
    res = bench_bundle(bundle, ckpt, iters=iters, warmup=warmup, device=device,
                       cuda_graphs=not no_cuda_graphs, log=lambda line: click.echo(line, err=True), profile=profile,
                       check_ids=check_ids)
    click.echo(table(res))
    if json_out:
        from .fsutil import write_json_atomic
        write_json_atomic(json_out, res)
        click.echo(f"wrote {json_out}")


@main.command()
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="A bundle from `build`.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model repository to write.")
@click.option("--backend", type=click.Choice(["python", "onnxruntime", "tensorrt"]), default="python", show_default=True,
              help="python: graphs in-process in the `actvar` model; onnxruntime / tensorrt: step and decoder models it calls.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True, help="Instances of each model (instance_group count).")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=50000, show_default=True,
              help="Dynamic batcher's wait for more requests when fewer than the bundle's batch are queued.")
@click.option("--force", is_flag=True, help="Replace a repository this command wrote earlier  [default: off]")
@click.option("--gpus", default=None, help="'all' (the GPUs seen here now) or indices '0,1': every model's instances on these GPUs, --instances per GPU (KIND_GPU)  [default: no kind, Triton places them]")
def triton(bundle, out, backend, instances, max_queue_delay_us, force, gpus):
    """Write a Triton Inference Server model repository for a bundle (config.pbtxt files, models, README
    with the server command lines), into a temporary directory renamed when complete.

    \b
    Example:
      actvar-export triton --bundle demo/bundle --out demo/repo --instances 2 --gpus 0,1
    """
    from .serving.repository import write_repository
    p = write_repository(bundle, out, backend, instances, max_queue_delay_us, force, opt.gpus(gpus))
    click.echo(f"wrote {p}: Triton model repository ({backend}); see {p / 'README.md'}")


@main.command()
@click.option("--repo", type=click.Path(path_type=Path), required=True, help="A model repository from `triton`.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Loopback HTTP port.")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True, help="Loopback gRPC port.")
@click.option("--gpus", default=None, help="'all' or '0,1': serve every model's instances on these GPUs (the repository's count per GPU; the repository is not changed)  [default: as the repository says]")
def serve(repo, http_port, grpc_port, gpus):
    """Start tritonserver on a model repository (loopback), wait until it is ready, print the endpoints;
    Ctrl-C or SIGTERM stops it.

    \b
    Example:
      actvar-export serve --repo demo/repo --http-port 8000 --grpc-port 8001
    """
    from .serving.server import serve as run
    sys.exit(run(repo, http_port, grpc_port, say=lambda m: click.echo(m, err=True), gpus=opt.gpus(gpus)))


@main.command()
@click.option("--url", required=True, help="Server address, e.g. 127.0.0.1:8000 (HTTP) or 127.0.0.1:8001 (gRPC).")
@click.option("--classes", required=True, help="ImageNet class ids (0..999), comma separated.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the request's canonical uniforms u.")
@click.option("--cfg", type=float, default=None, help="Guidance strength  [default: the model's, 1.5]")
@click.option("--top-p", type=float, default=None, help="Top-p in [0, 1]  [default: the model's, 0.96]")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True, help="Triton's HTTP or gRPC endpoint.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("grid.png"), show_default=True, help="PNG grid to write.")
@click.option("--raw", type=click.Path(path_type=Path), default=None, help="Also write the uint8 images (N, 256, 256, 3) as .npy  [default: none]")
@click.option("--shared-memory", is_flag=True, help="On the server's host: receive the images through a system shared-memory region instead of the connection  [default: off]")
def request(url, classes, seed, cfg, top_p, protocol, out, raw, shared_memory):
    """Request images from a served `actvar` model through tritonclient; write a PNG grid (and --raw).

    \b
    Example:
      actvar-export request --url 127.0.0.1:8000 --classes 1,2,3 --seed 0 --out grid.png --raw images.npy
    """
    from .images import save_grid, save_raw
    from .serving.client import request_images
    from .serving.generator import DEFAULT_CFG, DEFAULT_TOP_P, check_job
    labels = opt.classes(classes)
    opt.output_file(out, "--out")
    if raw is not None:
        opt.output_file(raw, "--raw")
    check_job(labels, seed, DEFAULT_CFG if cfg is None else cfg, DEFAULT_TOP_P if top_p is None else top_p)
    t = time.time()
    images = request_images(url, labels, seed, protocol, cfg, top_p, shared_memory=shared_memory)
    save_grid(images, out, labels=[f"class {c}" for c in labels], title=f"triton {url} seed={seed}")
    if raw:
        save_raw(images, raw)
    click.echo(f"wrote {out}{f' and {raw}' if raw else ''}: {len(labels)} images from {url} ({protocol}), {time.time() - t:.1f}s")


@main.command()
@click.option("--url", required=True, help="Server address: host:port, http://host:port or grpc://host:port.")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True, help="Concurrent clients (threads, one connection each).")
@click.option("--requests", "n_requests", type=click.IntRange(min=1), default=64, show_default=True, help="Requests in all.")
@click.option("--classes", default="207", show_default=True, help="ImageNet class ids of every request (its images).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of distinct request 0; distinct request d has seed + d.")
@click.option("--distinct", type=click.IntRange(min=1), default=4, show_default=True, help="Distinct requests; request i is distinct request i mod D.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default=None, help="Triton's HTTP or gRPC endpoint  [default: the URL's scheme, else http]")
@click.option("--bundle", type=click.Path(path_type=Path), default=None, help="The bundle the server serves: expected images from the in-process runtime  [default: none, the determinism rule]")
@click.option("--providers", default=None, help="With --bundle: cuda or cpu for the expected images  [default: CUDA where it runs, else CPU]")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the report as JSON  [default: none]")
def loadtest(url, concurrency, n_requests, classes, seed, distinct, protocol, bundle, providers, json_out):
    """Load a served `actvar` model with concurrent clients: images/s, latency p50/p90/p99, and every response
    checked against its classes and seed (exit 2 on any wrong image or failed request).

    \b
    Example:
      actvar-export loadtest --url 127.0.0.1:8001 --protocol grpc --concurrency 32 --requests 512 --bundle demo/bundle --json load.json
    """
    from .serving.loadtest import format_report, loadtest as run, passed
    labels = opt.classes(classes)
    if json_out is not None:
        opt.output_file(json_out, "--json")
    if bundle is not None:
        from .bundle import Bundle
        Bundle.open(bundle, verify=False)
    device = opt.runtime_device(providers) if bundle is not None else None
    r = run(url, concurrency, n_requests, labels, seed, distinct, protocol, bundle, device,
            say=lambda m: click.echo(m, err=True))
    click.echo(format_report(r))
    if json_out is not None:
        from .fsutil import write_json_atomic
        write_json_atomic(json_out, r)
        click.echo(f"wrote {json_out}")
    if not passed(r):
        click.echo(f"Error: {r['wrong_images']} wrong images, {r['failed_requests']} failed requests", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
