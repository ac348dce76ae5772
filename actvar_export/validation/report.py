"""`validate --report DIR`: report.json, report.md, errors.png, grid.png and polygraphy/ (each scale's
inputs and reference outputs as Polygraphy JSON), written into a temporary directory and renamed."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import List

import numpy as np
from PIL import Image, ImageDraw

from ..fsutil import replace_dir, temp_dir

from ..config import NUM_SCALES
from ..errors import ActVarError

CONT = (("logits", (200, 30, 30)), ("kv_out", (30, 90, 200)), ("f_hat_out", (30, 150, 60)), ("x_next", (160, 60, 180)))


def check_target(out: Path) -> None:
    """Before any work: the report directory must not hold anything but a previous report."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").exists())):
        raise ActVarError(f"--report {out}: exists and is not an earlier report directory; choose another path")


def polygraphy_command(bundle: Path, out: Path, si: int, rep) -> str:
    """The Polygraphy CLI line that re-checks scale si from the report (continuous outputs at their max
    tolerances, discrete outputs exactly: the saved reference carries the bundle's decisions). Portable
    bundles only: Polygraphy's ONNX Runtime loader registers no custom-op library."""
    if json.loads((Path(bundle) / "manifest.json").read_text()).get("lowering") == "plugin":
        return "(plugin bundle: Polygraphy's ONNX Runtime loader cannot register the custom ops; re-check with actvar-export validate)"
    s = next(s for s in rep.scales if s.scale == si)
    # the KV cache's tolerance is the default (every block's k_out.b / v_out.b), the other outputs by name
    atol = " ".join(f"{t[1]:.3e}" if n == "kv_out" else f"{n}:{t[1]:.3e}" for n, t in s.tolerances.items())
    return (f"polygraphy run {bundle}/step_{si}.onnx --onnxrt --load-inputs {out}/polygraphy/step_{si}_inputs.json "
            f"--load-outputs {out}/polygraphy/step_{si}_reference.json --check-error-stat max --rtol 0 --atol {atol}")


def errors_png(rep, path: Path) -> None:
    """Per scale: each continuous output's max abs error over its tolerance (log scale; the line at 1 is
    the tolerance) and, below, the explained flips per scale and the decoder's max error over its tolerance."""
    W, H, L, T, Bm = 640, 360, 60, 30, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    lo, hi = -4, 2                                            # log10(error / tolerance)
    y = lambda v: T + (hi - max(lo, min(hi, v))) / (hi - lo) * (H - T - Bm)
    x = lambda si: L + si * (W - L - 20) / (NUM_SCALES - 1)
    d.text((L, 8), f"max abs error / tolerance per scale ({rep.precision}); explained flips below", fill="black")
    for e in range(lo, hi + 1):
        d.line([(L, y(e)), (W - 20, y(e))], fill=(150, 0, 0) if e == 0 else (225, 225, 225), width=2 if e == 0 else 1)
        d.text((8, y(e) - 6), f"1e{e}", fill="black")
    for si in range(NUM_SCALES):
        d.text((x(si) - 3, H - Bm + 4), str(si), fill="black")
    for name, col in CONT:
        pts = [(x(s.scale), y(math.log10(max(s.errors[name] / s.tolerances[name][1], 1e-30))))
               for s in rep.scales if name in s.errors and math.isfinite(s.errors[name])]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=col)
    for i, (name, col) in enumerate(CONT):
        d.text((L + 110 * i, H - Bm + 20), name, fill=col)
    flips = {s.scale: sum(s.explained.values()) for s in rep.scales}
    d.text((L, H - 30), "explained flips: " + "  ".join(f"{k}:{v}" for k, v in flips.items()), fill="black")
    failed = [s.scale for s in rep.scales if s.failures]
    dec = rep.decoder
    dec_line = f";  decoder max error / tolerance {dec.error / dec.tolerances[1]:.3f}" if dec and dec.tolerances else ""
    d.text((L, H - 16), "failing scales: " + (", ".join(map(str, failed)) or "none") + dec_line,
           fill=(200, 0, 0) if failed or (dec and dec.failures) else "black")
    img.save(path, format="PNG")


def _heat(v: np.ndarray) -> np.ndarray:
    """[0, 1] -> black, red, yellow, white."""
    v = np.clip(v, 0, 1)[..., None]
    return (255 * np.clip(np.concatenate([3 * v, 3 * v - 1, 3 * v - 2], -1), 0, 1)).astype(np.uint8)


def grid_png(ref: np.ndarray, got: np.ndarray, path: Path, title: str) -> None:
    """Rows: reference | bundle | |difference| (channel mean) scaled so the largest is full scale, with the bar."""
    B, _, Hh, Ww = ref.shape
    pad, top, bar = 4, 20, 40
    diff = np.abs(got.astype(np.float64) - ref).mean(1)
    top_val = float(diff.max()) or 1.0
    img = Image.new("RGB", (B * (Ww + pad) + pad, top + 3 * (Hh + pad) + bar), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 4), title, fill="black")
    u8 = lambda a: (np.clip(a, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
    for b in range(B):
        xo = pad + b * (Ww + pad)
        for row, tile in enumerate((u8(ref[b]), u8(got[b]), _heat(diff[b] / top_val))):
            img.paste(Image.fromarray(tile), (xo, top + row * (Hh + pad)))
    yb = top + 3 * (Hh + pad) + 4
    ramp = _heat(np.tile(np.linspace(0, 1, 200), (10, 1)))
    img.paste(Image.fromarray(ramp), (pad + 40, yb))
    d.text((pad, yb), "0", fill="black")
    d.text((pad + 245, yb), f"{top_val:.3g} (|bundle - reference|, channel mean)", fill="black")
    d.text((pad, yb + 14), "rows: reference, bundle, scaled difference", fill="black")
    img.save(path, format="PNG")


def report_md(rep, bundle: Path, out: Path, header: List[str]) -> str:
    lines = ["# Bundle validation report", "", *header, "", f"Result: **{'PASS' if not rep.failures else 'FAIL'}**", "",
             "```", rep.table(), "```", ""]
    if rep.failures:
        lines += ["## Failures", ""] + [f"- {f}" for f in rep.failures] + [""]
    lines += ["## Tolerances", "", "```", json.dumps(rep.tolerances, indent=1), "```", "",
              "## Re-check one scale with Polygraphy", "", "```", polygraphy_command(bundle, out, max(s.scale for s in rep.scales), rep), "```", ""]
    return "\n".join(lines)


def write_report(out: Path, rep, bundle: Path, header: List[str]) -> Path:
    """Everything into a temporary sibling directory, then renamed over `out` (an earlier report only)."""
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json
    from .runners import unpack_cache
    out = Path(out)
    check_target(out)
    tmp = temp_dir(out)
    try:
        (tmp / "polygraphy").mkdir()
        for si, (feed, results) in rep.polygraphy.items():
            # in the graph's own terms (per-block caches) for Polygraphy's CLI
            save_json([dict(unpack_cache(feed, "in"))], str(tmp / "polygraphy" / f"step_{si}_inputs.json"))
            ref = RunResults()
            it = results[1][1][0]
            ref.append(("reference", [IterationResult(unpack_cache(it, "out"), it.runtime, it.runner_name)]))
            ref.save(str(tmp / "polygraphy" / f"step_{si}_reference.json"))
        (tmp / "report.json").write_text(json.dumps(rep.to_dict() | {"bundle": str(bundle), "header": header}, indent=1))
        (tmp / "report.md").write_text(report_md(rep, bundle, out, header))
        errors_png(rep, tmp / "errors.png")
        if rep.images:
            e = rep.end_to_end
            grid_png(rep.images["reference"], rep.images["bundle"], tmp / "grid.png",
                     f"validate {rep.precision}: PSNR {e['psnr_db']:.1f} dB, token agreement {100 * e['token_agreement']:.2f}%")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
