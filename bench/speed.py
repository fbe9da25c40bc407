"""Speed benchmark: seconds per training step and peak memory of each method, against the floor and diffusers.

For every batch size it measures, each in its own process (so memory peaks do not carry over):
- each method (ti, dti, batex, catversion) through the pack's own path: `create_method` + `trainers.loop.train`
  on a `ComfyHost`, as Learn Concept runs it; the median of the measured steps after the warm-up steps;
- the floor: the same ComfyHost with no method — one CLIP forward+backward and one UNet forward+backward to
  its conditioning, no optimizer, no loop; step/floor is what the method and the loop add;
- diffusers' examples/textual_inversion step (bench/speed_diffusers.py) on equal models: "matched" (our batch,
  precision and checkpointing) and, once, "as its README instructs" (batch 1 × gradient accumulation 4; fp32
  for SD 1.5, whose README command sets no mixed precision; bf16 for SDXL, as README_sdxl.md sets).
It prints a table and writes bench/out/speed.json: date, hardware, versions, settings, and per method the
median step time, the floor, their ratio, peak memory and the time to a 400-step DTI concept.

    COMFYUI_PATH=/opt/comfyui python bench/speed.py                      # tiny models on the CPU, ~3-4 min
    COMFYUI_PATH=/opt/comfyui python bench/speed.py --size sd15 sdxl     # full architectures on a GPU
    ... --precision fp16 --gradient-checkpointing --batch 4 --methods dti

Sizes: tiny = tests/support/tiny_comfy.py at 64 px (CPU by default); sd15 = SD 1.5 at 512 px, sdxl = SDXL at
1024 px (random weights, CUDA by default). The diffusers baseline needs `pip install -r bench/requirements.txt`;
without it those rows are skipped. On a shared or small CPU the numbers are noisy: read the medians and the
interquartile ranges, not single steps.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "speed.json"
METHODS = ("ti", "dti", "batex", "catversion")
EXTRA_METHODS = ("tuning_encoder",)  # measured on request: --methods tuning_encoder
SIZE_NAMES = ("tiny", "sd15", "sdxl", "tiny-sd3", "tiny-flux", "tiny-lumina2")
README_PRECISION = {"tiny": "fp32", "sd15": "fp32", "sdxl": "bf16"}  # the README commands' --mixed_precision
DTI_STEPS = 400  # DTI's recipe (trainers/methods/dti.py Options.steps)


# -- the worker side --------------------------------------------------------------------------------------------
def worker(spec: dict[str, Any]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from speed_common import device_info, emit, pick_device

    device = pick_device(spec["device"])
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    if spec["kind"] == "diffusers":
        from speed_diffusers import run_diffusers as run
    elif spec["kind"] == "floor":
        from speed_comfy import run_floor as run
    else:
        from speed_comfy import run_method as run
    result = run(spec, device)
    emit({**result, "kind": spec["kind"], "env": device_info(device)})


# -- the parent side --------------------------------------------------------------------------------------------
def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One configuration in a fresh interpreter; its result line, or the error it died with."""
    from speed_common import RESULT_PREFIX

    # OpenMP threads that spin while another process holds the core make steps 10-50x slower on a shared CPU
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
            result["process_s"] = time.perf_counter() - start
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    # paths relative to the checkout, so a result file says nothing of the machine that wrote it
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail).replace(f"{ROOT}{os.sep}", "")}


def hardware() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def comfyui_version() -> str | None:
    try:
        text = (Path(os.environ.get("COMFYUI_PATH", "")) / "comfyui_version.py").read_text()
        return text.split('__version__ = "')[1].split('"')[0]
    except (OSError, IndexError):
        return None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def median(result: dict[str, Any] | None) -> float | None:
    return None if not result or "error" in result else result["median_s"]


def peak(result: dict[str, Any] | None) -> float | None:
    return None if not result or "error" in result else result["peak_mb"]


def summarise_batch(floor: dict[str, Any], methods: dict[str, dict[str, Any]],
                    matched: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"floor": floor, "methods": {}}
    for name, result in methods.items():
        paired = result.get("paired_floor", {}).get("median_s")
        # the ratio uses the floor measured in the method's own process just before it (same load window)
        out["methods"][name] = {**result, "floor_s": paired, "ratio": ratio(median(result), paired),
                                "standalone_floor_s": median(floor),
                                "ratio_to_standalone_floor": ratio(median(result), median(floor))}
    dti = methods.get("dti")
    if median(dti) is not None:
        assert dti is not None
        setup = dti["setup_s"]
        out["dti_400_steps_s"] = {"total_s": round(DTI_STEPS * dti["median_s"] + setup, 2),
                                  "steps_s": round(DTI_STEPS * dti["median_s"], 2), "setup_s": round(setup, 3),
                                  "latent_encoding_s": round(dti["latent_encoding_s"], 3)}
    if matched is not None:
        ti = methods.get("ti")
        out["diffusers_matched"] = {**matched, "floor_s": median(floor),
                                    "ratio": ratio(median(matched), median(floor)),
                                    "vs_ti": {"step": ratio(median(matched), median(ti)),
                                              "peak_memory": ratio(peak(matched), peak(ti))}}
    return out


def summarise_readme(readme: dict[str, Any], batches: dict[str, Any]) -> dict[str, Any]:
    """The README run sees 4 samples per optimizer step: compare it with our batch-4 step, and per sample."""
    out = dict(readme)
    ours = batches.get("4") or (batches[max(batches, key=int)] if batches else None)
    if ours and median(readme) is not None:
        ti = ours["methods"].get("ti")
        if median(ti) is not None:
            per_sample = readme["median_s"] / readme["samples_per_step"]
            out["vs_ti"] = {"ti_batch": ti["batch"], "step": ratio(median(readme), median(ti)),
                            "per_sample": ratio(per_sample, ti["median_s"] / ti["batch"]),
                            "peak_memory": ratio(peak(readme), peak(ti))}
    return out


def fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.3f} s"


def table_row(batch: str, label: str, r: dict[str, Any], floor: float | None, ratio_text: str) -> str:
    if "error" in r or "skipped" in r:
        return f"{batch:>5}  {label:<27} {r.get('error') or r.get('skipped')}"
    spread = f"{fmt_s(r['p25_s'])}–{fmt_s(r['p75_s'])}"
    per_sample = r["median_s"] / r["samples_per_step"]
    return (f"{batch:>5}  {label:<27} {fmt_s(r['median_s']):>10} {spread:>19} {fmt_s(floor):>10} {ratio_text:>12} "
            f"{fmt_s(per_sample):>10} {r['peak_mb']:>8.0f} {r['step_peak_mb']:>8.0f}")


def print_size(record: dict[str, Any]) -> None:
    s = record["settings"]
    unit = "peak CUDA allocated" if s["device"] == "cuda" else "peak RSS"
    print(f"\n== {record['size']} ({s['arch']}, {s['resolution']} px, {s['device']}, {s['precision']}, gradient "
          f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}): median of {s['steps']} steps after "
          f"{s['warmup']} warm-up; memory = {unit} in MB (whole process / measured steps) ==")
    print(f"{'batch':>5}  {'configuration':<27} {'step':>10} {'p25–p75':>19} {'floor':>10} {'ratio':>12} "
          f"{'/sample':>10} {'peak':>8} {'steps':>8}")
    for batch, b in record["batches"].items():
        floor = b["floor"]
        print(table_row(batch, "floor, own process", floor, median(floor), "1.00"))
        for name, r in b["methods"].items():
            print(table_row(batch, name, r, r.get("floor_s"), f"{r['ratio']:.2f}" if r.get("ratio") else "-"))
        m = b.get("diffusers_matched")
        if m is not None:
            vs = m.get("vs_ti", {})
            print(table_row(batch, f"diffusers matched {m.get('batch', batch)}×1", m, median(floor),
                            f"{vs['step']:.2f}×TI" if vs.get("step") else "-"))
    readme = record.get("diffusers_readme")
    if readme is not None:
        vs = readme.get("vs_ti", {})
        print(table_row("1×4", f"diffusers README {readme.get('precision', '')}", readme, None,
                        f"{vs['step']:.2f}×TI{vs['ti_batch']}" if vs.get("step") else "-"))
    print("ratio: a method's median step over the floor measured in its own process just before it; diffusers "
          "rows: over our TI step at the same batch (README: TI at batch 4, the same 4 samples per step).")
    for batch, b in record["batches"].items():
        d = b.get("dti_400_steps_s")
        if d:
            print(f"Time to a {DTI_STEPS}-step DTI concept at batch {batch}: {d['total_s']:.1f} s "
                  f"({DTI_STEPS} × median step = {d['steps_s']:.1f} s, setup {d['setup_s']:.2f} s of which latent "
                  f"encoding {d['latent_encoding_s']:.2f} s)")
    for batch, b in record["batches"].items():
        m = b.get("diffusers_matched")
        if m and m.get("vs_ti", {}).get("peak_memory"):
            print(f"diffusers matched vs TI at batch {batch}: step ×{m['vs_ti']['step']:.2f}, "
                  f"peak memory ×{m['vs_ti']['peak_memory']:.2f}")
    if readme and readme.get("vs_ti"):
        vs = readme["vs_ti"]
        print(f"diffusers README (1×4) vs TI at batch {vs['ti_batch']}: optimizer step ×{vs['step']:.2f}, per sample "
              f"×{vs['per_sample']:.2f}, peak memory ×{vs['peak_memory']:.2f}")


def save(record: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", nargs="+", choices=SIZE_NAMES, default=["tiny"])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: tiny on the CPU, sd15/sdxl on CUDA")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help="ComfyHost's precision (UNet compute; the text encoders are built in it too); "
                             "default fp32 on the CPU, bf16 on CUDA")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--methods", nargs="+", choices=METHODS + EXTRA_METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=20, help="measured steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--resolution", type=int, help="override the size's resolution (multiple of 64)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per worker on a CPU; default 1 (tiny "
                        "models are latency-bound, and one thread keeps the numbers steady on a shared CPU); 0 = "
                        "torch's choice")
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers baseline")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 2:
        parser.error("--warmup must be at least 1 and --steps at least 2")
    if args.resolution is not None and args.resolution % 64:
        parser.error("--resolution must be a multiple of 64")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return {}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from speed_common import SIZES

    have_diffusers = importlib.util.find_spec("diffusers") is not None
    started = time.perf_counter()
    record: dict[str, Any] = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                              "hardware": hardware(), "comfyui": comfyui_version(),
                              "load_average_start": load_average(),
                              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "sizes": {}}
    for size_name in args.size:
        size = SIZES[size_name]
        device = size.device if args.device == "auto" else args.device
        precision = args.precision or ("fp32" if device == "cpu" else "bf16")
        threads = (1 if args.threads is None else args.threads) if device == "cpu" else args.threads
        base = {"size": size.__dict__, "device": device, "precision": precision, "warmup": args.warmup,
                "steps": args.steps, "resolution": args.resolution or size.resolution,
                "gradient_checkpointing": args.gradient_checkpointing, "threads": threads or None}
        settings = {**base, "arch": size.arch, "size": size_name, "methods": args.methods, "batches": args.batch}

        def run(size_name: str = size_name, base: dict[str, Any] = base, **spec: Any) -> dict[str, Any]:
            label = f"{size_name} {spec['kind']} {spec.get('method', '')} batch {spec['batch']}"
            print(f"  running {label} ...", end="", flush=True)
            result = run_worker({**base, **spec}, args.timeout)
            print(f" {fmt_s(result.get('median_s'))}" if "error" not in result else f" FAILED: {result['error']}",
                  flush=True)
            return result

        batches: dict[str, Any] = {}
        env: dict[str, Any] = {}
        for batch in args.batch:
            floor = run(kind="floor", method="floor", batch=batch)
            methods = {name: run(kind="method", method=name, batch=batch) for name in args.methods}
            matched = None
            if not args.no_diffusers:
                matched = (run(kind="diffusers", method="diffusers_matched", batch=batch, grad_accum=1)
                           if have_diffusers else {"skipped": "diffusers is not installed (bench/requirements.txt)"})
            batches[str(batch)] = summarise_batch(floor, methods, matched)
            env = env or next((r["env"] for r in [floor, *methods.values()] if "env" in r), {})
            record["sizes"][size_name] = {"size": size_name, "settings": settings, "env": env, "batches": batches}
            save(record, args.out)   # a run cut short keeps what it measured
        size_record: dict[str, Any] = {"size": size_name, "settings": settings, "env": env, "batches": batches}
        if not args.no_diffusers:
            if have_diffusers:
                readme = run(kind="diffusers", method="diffusers_readme", batch=1, grad_accum=4,
                             precision=README_PRECISION[size_name], gradient_checkpointing=False)
                size_record["diffusers_readme"] = summarise_readme(readme, batches)
            else:
                size_record["diffusers_readme"] = {"skipped": "diffusers is not installed (bench/requirements.txt)"}
        record["sizes"][size_name] = size_record
        record.setdefault("torch", env.get("torch"))
        if env.get("gpu"):
            record["hardware"]["gpu"] = env["gpu"]
        print_size(size_record)
    record["load_average_end"] = load_average()
    record["wall_s"] = round(time.perf_counter() - started, 1)
    save(record, args.out)
    print(f"\nwrote {args.out} ({record['wall_s']:.0f} s; load average {record['load_average_start']} → "
          f"{record['load_average_end']})")
    return record


if __name__ == "__main__":
    main()
