"""GPU benchmark: UNet training throughput, sampler latency and a LOL-sized evaluation, for both
UNet layouts (`unet.layout`: srdiff, ours; daclip, DA-CLIP's as released).

One script, one call on a lent H100/H200: correctness checks on the device first, then timings, a
table printed last and a JSON file written. Every row also reports the model FLOPs per image
(matmuls, convolutions and attention, counted by torch.utils.flop_counter on the meta device, so
counting costs no device time) and the TFLOP/s achieved, i.e. utilisation, not only speed.
Training FLOPs are forward + backward without the recomputation of DA-CLIP's checkpointed blocks.
A row that runs out of device memory is reported as such and the others still run (DA-CLIP's
layout took 130 GiB for 100 steps at 1280x720 in DESIGN.md's figures; 32 GiB for our 10 closed-form
jumps). Both layouts took 247 s on an H200 (2026-12-04, torch.compile's warm-up 102 s of it;
DA-CLIP's rows run eager only); `--layouts srdiff` skips DA-CLIP's. CI runs the same code on the
CPU at toy size (`--toy`, see tests/test_bench.py).

    python bench/gpu.py [--toy] [--out bench/results/gpu-<device>.json] [--no-compile]
                        [--layouts srdiff daclip]

Reference (DESIGN.md, DA-CLIP's UNet on one H200): training 72 img/s at batch 16, 256 px, fp32,
36 GiB; 100 posterior steps 2.8 s at 480x320, 20.6 s and 130 GiB at 1280x720.
Targets (issue 6/7): training >= 215 img/s at <= 18 GiB; 1280x720 in <= 1 s at <= 16 GiB;
the 15 LOL val images (600x400) in < 30 s.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import finish  # noqa: E402
from srdiff_core import metrics, samplers, training  # noqa: E402
from srdiff_core.config import TrainConfig, UNetConfig  # noqa: E402
from srdiff_core.sde import IRSDE  # noqa: E402
from srdiff_core.unet import build_unet  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """Everything that scales between the real benchmark and CI's toy run."""

    unet: UNetConfig
    train_batch: int
    train_px: int
    train_steps: int
    small_hw: tuple[int, int]      # 100-step sampling
    large_hw: tuple[int, int]      # K-step sampling
    lol_hw: tuple[int, int]
    lol_images: int
    k_steps: int
    tile: int


FULL = Sizes(unet=UNetConfig(nf=64, ch_mult=[1, 2, 4, 8], context_dim=512), train_batch=16, train_px=256,
             train_steps=30, small_hw=(320, 480), large_hw=(720, 1280), lol_hw=(400, 600), lol_images=15,
             k_steps=10, tile=0)
TOY = Sizes(unet=UNetConfig(nf=8, ch_mult=[1, 2], num_res_blocks=1, context_dim=16), train_batch=2, train_px=32,
            train_steps=2, small_hw=(24, 40), large_hw=(40, 72), lol_hw=(24, 36), lol_images=2, k_steps=3, tile=32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


LAYOUTS = ("srdiff", "daclip")


def unet_config(sizes: Sizes, layout: str) -> UNetConfig:
    return sizes.unet.model_copy(update={"layout": layout})


def make_model(sizes: Sizes, device: torch.device, layout: str = "srdiff") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet(unet_config(sizes, layout)).to(device)


def parameter_count(sizes: Sizes, layout: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_unet(unet_config(sizes, layout)).parameters())


def model_flops(sizes: Sizes, layout: str, batch: int, hw: tuple[int, int], *, backward: bool) -> float:
    """FLOPs of one UNet forward (and backward) per image at ``hw``, counted on the meta device.

    The model is in eval mode, so DA-CLIP's checkpointed transformer blocks are not recomputed:
    these are model FLOPs, the work the layout needs, not what a memory-saving schedule adds."""
    with torch.device("meta"):
        model = build_unet(unet_config(sizes, layout)).eval()
        x = torch.empty(batch, 3, *hw)
        context = torch.empty(batch, sizes.unet.context_dim)
        t = torch.full((batch,), 5, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        out = model(x, x, t, context)
        if backward:
            out.sum().backward()
    return counter.get_total_flops() / batch


def with_flops(row: dict, flops_per_image: float, images_per_s: float) -> dict:
    """``row`` plus GFLOP per image and the TFLOP/s achieved at ``images_per_s``."""
    return {**row, "gflop_per_img": flops_per_image / 1e9, "tflop_per_s": flops_per_image * images_per_s / 1e12}


def guarded(device: torch.device, bench, *args, **kwargs) -> dict:
    """``bench(*args, **kwargs)``, or a row saying it ran out of device memory (the next rows still run)."""
    try:
        return bench(*args, **kwargs)
    except torch.OutOfMemoryError as e:
        reset_peak(device)
        print(f"out of memory: {str(e).splitlines()[0]}", flush=True)
        return {"error": "out of memory"}


def random_batch(sizes: Sizes, device: torch.device, generator: torch.Generator) -> dict:
    shape = (sizes.train_batch, 3, sizes.train_px, sizes.train_px)
    gt = torch.rand(shape, generator=generator).to(device)
    return {"gt": gt, "lq": (gt * 0.5 + 0.1 * torch.rand(shape, generator=generator).to(device)).clamp(0, 1),
            "context": torch.nn.functional.normalize(
                torch.randn(sizes.train_batch, sizes.unet.context_dim, generator=generator), dim=-1).to(device)}


def bench_train(sizes: Sizes, device: torch.device, *, precision: str, compile: bool, layout: str = "srdiff") -> dict:
    """Images/s of `training.train_step` (loss, backward, clip, AdamW, EMA) on device-resident batches."""
    cfg = TrainConfig(batch_size=sizes.train_batch, patch_size=sizes.train_px, precision=precision,
                      compile=compile, channels_last=compile, steps=10_000)
    model = make_model(sizes, device, layout)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = training.build_optimizer(model, cfg)
    runner = torch.compile(model) if compile else model
    state = training.TrainState(runner, training.make_ema(model), optimizer, scheduler, 0,
                                torch.Generator(device=device).manual_seed(0))
    sde = IRSDE(10.0)
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(sizes, device, gen) for _ in range(4)]
    reset_peak(device)
    start = time.perf_counter()
    for i in range(3):  # warm-up (and compilation)
        training.train_step(state, sde, batches[i % 4], cfg, device=device)
    sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(sizes.train_steps):
        out = training.train_step(state, sde, batches[i % 4], cfg, device=device)
    sync(device)
    seconds = time.perf_counter() - start
    assert math.isfinite(out["loss"]), "training loss is not finite"
    img_per_s = sizes.train_batch * sizes.train_steps / seconds
    flops = model_flops(sizes, layout, sizes.train_batch, (sizes.train_px, sizes.train_px), backward=True)
    return with_flops({"img_per_s": img_per_s, "peak_gib": peak_gib(device), "warmup_s": warmup_s}, flops, img_per_s)


def bench_sample(sizes: Sizes, device: torch.device, model, hw: tuple[int, int], *, steps: int,
                 precision: str, tile: int = 0, repeats: int = 2, layout: str = "srdiff") -> dict:
    """Seconds per image of `samplers.restore` (one image, `steps` posterior jumps); FLOPs are
    those of the untiled image (tiles add their overlaps)."""
    gen = torch.Generator().manual_seed(1)
    lq = torch.rand(1, 3, *hw, generator=gen).to(device)
    context = torch.nn.functional.normalize(torch.randn(1, sizes.unet.context_dim, generator=gen), dim=-1).to(device)
    autocast = torch.bfloat16 if precision == "bf16" else None
    run = lambda: samplers.restore(model, lq, IRSDE(10.0), context, steps=steps,  # noqa: E731
                                   generator=torch.Generator(device=device).manual_seed(0), tile_size=tile, tile_overlap=tile // 4,
                                   autocast_dtype=autocast)
    run()  # warm-up
    reset_peak(device)
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        sync(device)
        times.append(time.perf_counter() - start)
    assert torch.isfinite(out).all()
    seconds = sorted(times)[len(times) // 2]
    flops = steps * model_flops(sizes, layout, 1, hw, backward=False)
    return with_flops({"seconds": seconds, "peak_gib": peak_gib(device)}, flops, 1.0 / seconds)


def bench_lol_eval(sizes: Sizes, device: torch.device, model, layout: str = "srdiff") -> dict:
    """The evaluate stage's inner loop on LOL-sized images: K-step bf16 restore + all metrics."""
    gen = torch.Generator().manual_seed(2)
    sde = IRSDE(10.0)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    sync(device)
    start = time.perf_counter()
    for i in range(sizes.lol_images):
        lq = torch.rand(1, 3, *sizes.lol_hw, generator=gen).to(device)
        gt = torch.rand(1, 3, *sizes.lol_hw, generator=gen).to(device)
        context = torch.nn.functional.normalize(torch.randn(1, sizes.unet.context_dim, generator=gen), dim=-1)
        out = samplers.restore(model, lq, sde, context.to(device), steps=sizes.k_steps,
                               generator=torch.Generator(device=device).manual_seed(0), autocast_dtype=autocast)
        values = metrics.image_metrics(metrics.quantize_uint8(out).float(), gt, border=4)
    sync(device)
    assert all(torch.isfinite(v).all() for v in values.values())
    seconds = time.perf_counter() - start
    flops = sizes.k_steps * model_flops(sizes, layout, 1, sizes.lol_hw, backward=False)
    return with_flops({"seconds": seconds, "images": sizes.lol_images}, flops, sizes.lol_images / seconds)


def check_device_matches_cpu(sizes: Sizes, device: torch.device, layout: str = "srdiff") -> dict:
    """The UNet and the sampler on `device` against float64 on the CPU (same weights, same noise)."""
    model = make_model(sizes, torch.device("cpu"), layout)
    torch.nn.init.normal_(model.final_conv.weight, std=0.02)  # zero-init would make the check vacuous
    gen = torch.Generator().manual_seed(3)
    lq = torch.rand(2, 3, 40, 56, generator=gen)
    x = (lq + 0.04 * torch.randn(lq.shape, generator=gen))
    t = torch.tensor([3, 77])
    ctx = torch.nn.functional.normalize(torch.randn(2, sizes.unet.context_dim, generator=gen), dim=-1)
    with torch.no_grad():
        ref = model.double()(x.double(), lq.double(), t, ctx.double())
        dev_model = copy.deepcopy(model).float().to(device)
        model = model.float()
        out = dev_model(x.to(device), lq.to(device), t.to(device), ctx.to(device)).double().cpu()
        rel = float((out - ref).norm() / ref.norm())
        sde = IRSDE(10.0)
        a = samplers.restore(dev_model, lq.to(device), sde, ctx.to(device), steps=5,
                             generator=torch.Generator().manual_seed(0)).cpu()
        b = samplers.restore(model, lq, sde, ctx, steps=5, generator=torch.Generator().manual_seed(0))
    return {"unet_rel_err_vs_fp64": rel, "sampler_max_abs_diff_vs_cpu": float((a - b).abs().max())}


def run_layout(sizes: Sizes, device: torch.device, layout: str, *, compile: bool) -> dict:
    """The rows of one UNet layout, each named "<layout>: <benchmark>"."""
    rows = {}
    precisions = ["fp32", "bf16"]
    for precision in precisions:
        rows[f"{layout}: train {precision} eager"] = guarded(device, bench_train, sizes, device, precision=precision,
                                                             compile=False, layout=layout)
        print(rows, flush=True)
    if compile:
        rows[f"{layout}: train bf16 compile"] = guarded(device, bench_train, sizes, device, precision="bf16",
                                                        compile=True, layout=layout)
    model = make_model(sizes, device, layout).eval()
    h, w = sizes.small_hw
    for precision in precisions:
        rows[f"{layout}: sample 100 steps {w}x{h} {precision}"] = guarded(
            device, bench_sample, sizes, device, model, sizes.small_hw, steps=100, precision=precision, layout=layout)
    H, W = sizes.large_hw
    rows[f"{layout}: sample {sizes.k_steps} steps {W}x{H} bf16"] = guarded(
        device, bench_sample, sizes, device, model, sizes.large_hw, steps=sizes.k_steps, precision="bf16",
        layout=layout)
    if sizes.tile:
        rows[f"{layout}: sample {sizes.k_steps} steps {W}x{H} bf16 tiles {sizes.tile}"] = guarded(
            device, bench_sample, sizes, device, model, sizes.large_hw, steps=sizes.k_steps, precision="bf16",
            tile=sizes.tile, layout=layout)
    rows[f"{layout}: LOL eval {sizes.lol_images} x {sizes.lol_hw[1]}x{sizes.lol_hw[0]} K={sizes.k_steps}"] = \
        guarded(device, bench_lol_eval, sizes, device, model, layout=layout)
    del model
    reset_peak(device)
    return rows


def run(sizes: Sizes, device: torch.device, *, compile: bool, layouts: tuple[str, ...] = LAYOUTS) -> dict:
    """Checks, then the rows of each layout. torch.compile (``compile``) only for ours: DA-CLIP's
    layout is timed as released, eager."""
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                     or "cpu", "torch": torch.__version__, "sizes": repr(sizes), "layouts": list(layouts),
                     "parameters": {layout: parameter_count(sizes, layout) for layout in layouts}}
    results["checks"] = {layout: check_device_matches_cpu(sizes, device, layout) for layout in layouts}
    print("checks:", results["checks"], flush=True)
    rows = {}
    for layout in layouts:
        rows.update(run_layout(sizes, device, layout, compile=compile and layout == "srdiff"))
    results["rows"] = rows
    return results


def table(results: dict) -> str:
    params = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in results.get("parameters", {}).items())
    lines = [f"device: {results['device']}  torch {results['torch']}",
             f"parameters: {params}",
             f"checks: {json.dumps(results['checks'])}",
             f"{'benchmark':<56} {'img/s':>8} {'seconds':>9} {'peak GiB':>9} {'GFLOP/img':>10} {'TFLOP/s':>8}"]
    for name, row in results["rows"].items():
        if "error" in row:
            lines.append(f"{name:<56} {row['error']}")
            continue
        ips = f"{row['img_per_s']:.1f}" if "img_per_s" in row else ""
        sec = f"{row['seconds']:.3f}" if "seconds" in row else ""
        peak = f"{row['peak_gib']:.2f}" if "peak_gib" in row and not math.isnan(row["peak_gib"]) else ""
        gflop = f"{row['gflop_per_img']:.1f}" if "gflop_per_img" in row else ""
        tflops = f"{row['tflop_per_s']:.2f}" if "tflop_per_s" in row else ""
        lines.append(f"{name:<56} {ips:>8} {sec:>9} {peak:>9} {gflop:>10} {tflops:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="tiny sizes (CI, CPU)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=None, help="JSON output (default bench/out/gpu.json)")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
                        help="UNet layouts to time (default: both)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = TOY if args.toy or device.type == "cpu" else FULL
    with training.cuda_backends_for_training() if device.type == "cuda" else nullcontext():  # the train stage's settings
        results = run(sizes, device, compile=not args.no_compile and not args.toy, layouts=tuple(args.layouts))
    return finish(results, args.out, "gpu.json", table)


if __name__ == "__main__":
    main()
