"""GPU benchmark (bf16): MoE layer TFLOP/s against the measured matmul peak, and train-step MFU.

    python benchmarks/bench_gpu.py [--json bench-results/gpu.json]     # on a GPU machine
    python benchmarks/bench_gpu.py --smoke                             # tiny shapes, any backend

Reports, all measured in the same run:
  peak     bf16 matmul TFLOP/s of a large square matmul (the reference for every ratio),
  layer    the MoE layer (B/16 shape: D=768, H=3072, E=32, K=2, C=1.05) forward+backward, in
           TFLOP/s of the expert matmuls it actually runs (capacity slots included) and as a
           fraction of the peak; also the one-hot einsum path and a dense MLP of hidden K*H,
  matmul   the experts' matmul computed as one batched matmul over [E, T, D] buffers (the
           layer's default), a loop over experts, and jax.lax.ragged_dot over sorted tokens
           (grouped GEMM), against one GEMM of the same FLOPs: which form to use on this GPU,
  train    V-MoE-B/16 (every-2, E=32) and ViT-B/16 SGD train steps: time, the ratio, and MFU
           (XLA's FLOP count of the compiled step over time over the peak).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
from bench_moe_layer import DenseMlp, grouped_matmul_rows, sgd_step
from harness import environment, print_table, time_ms

import vmoe_layers as vl
import vmoe_routing as vr


def compiled_flops(jitted, *args: Any) -> float:
    """XLA's FLOP count of the compiled program (0 when the backend does not report it)."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):  # older jax returned one dict per device
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def matmul_peak_tflops(n: int, dtype) -> float:
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    ms = time_ms(matmul, a, a, repeats=10, warmup=3)
    return 2 * n**3 / ms / 1e9


def layer_rows(tokens: int, group: int, d: int, h: int, e: int, k: int, c: float, dtype, peak):
    x = jax.random.normal(jax.random.key(0), (tokens // group, group, d), dtype)
    capacity = vr.compute_capacity(group, e, k, c)
    expert_flops = 3 * 2 * 2 * (tokens // group) * e * capacity * d * h  # fwd+bwd, 2 matmuls
    dense_flops = 3 * 2 * 2 * tokens * d * k * h
    moe = vl.MoeLayer(
        num_experts=e,
        mlp_dim=h,
        router_options={"k": k, "capacity_factor": c},
        dtype=dtype,
        param_dtype=jnp.float32,
    )
    rows = []
    for name, module, flops in (
        ("dense K*H", DenseMlp(k * h), dense_flops),
        ("moe (index)", moe, expert_flops),
        ("moe (einsum)", moe.clone(dispatch_path="einsum"), expert_flops),
    ):
        params = module.init(jax.random.key(1), x)["params"]

        def loss(params, x, module=module):
            out = module.apply({"params": params}, x)
            out = out.output if isinstance(out, vl.MoeOutput) else out
            return jnp.mean(out.astype(jnp.float32) ** 2)

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        ms = time_ms(step, params, x)
        tflops = flops / ms / 1e9
        rows.append({"path": name, "fwd+bwd ms": ms, "TFLOP/s": tflops, "of peak": tflops / peak})
    base = rows[0]["fwd+bwd ms"]
    for row in rows:
        row["time / dense K*H"] = row["fwd+bwd ms"] / base
    return rows


def train_rows(batch: int, image: int, dtype, peak, **moe_options):
    images = jax.random.normal(jax.random.key(0), (batch, image, image, 3), dtype)
    labels = jax.random.randint(jax.random.key(1), (batch,), 0, 1000)
    vmoe = vl.create_model(moe_options.pop("name"), num_classes=1000, dtype=dtype, **moe_options)
    rows = []
    for name, model in (("V-MoE", vmoe), ("ViT twin", vmoe.clone(moe=None))):
        params = model.init(jax.random.key(2), images)["params"]
        step = sgd_step(model)
        ms = time_ms(step, params, images, labels, repeats=5)
        flops = compiled_flops(step, params, images, labels)
        rows.append(
            {
                "model": name,
                "step ms": ms,
                "img/s": batch / ms * 1e3,
                "TFLOP/s (XLA count)": flops / ms / 1e9,
                "MFU": flops / ms / 1e9 / peak,
            }
        )
    rows[0]["step / ViT step"] = rows[0]["step ms"] / rows[1]["step ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on any backend")
    parser.add_argument("--json", default="bench-results/gpu.json")
    args = parser.parse_args()
    backend = jax.default_backend()
    if backend != "gpu" and not args.smoke:
        sys.exit(f"no GPU (backend {backend!r}); use --smoke to check the script on this backend")

    dtype = jnp.bfloat16
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    report: dict[str, Any] = {"environment": environment()}

    def section(key: str, title: str, rows: list[dict[str, Any]], columns=None) -> None:
        """Prints one table as soon as it is measured and rewrites the JSON with it, so a run
        cut short (a device lease ends) still leaves what it measured."""
        report[key] = rows
        print(f"\n{title}", flush=True)
        print_table(rows, columns or list(rows[0]))
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)

    print(environment(), flush=True)
    peak = matmul_peak_tflops(256 if args.smoke else 8192, dtype)
    report["peak_tflops"] = peak
    print(f"bf16 matmul peak: {peak:.1f} TFLOP/s", flush=True)
    if args.smoke:
        layer = layer_rows(256, 64, 32, 64, 4, 2, 1.05, dtype, peak)
    else:
        # B/16 at 224px: 197 tokens an image; 256 images, groups of 2 images.
        layer = layer_rows(197 * 256, 394, 768, 3072, 32, 2, 1.05, dtype, peak)
    section("layer", "MoE layer forward+backward", layer)
    if args.smoke:
        matmuls = [grouped_matmul_rows(16, 4, 32, 64, 3, dtype)]
    else:
        # Tokens per expert for that layer: 128 groups x capacity 26.
        matmuls = [grouped_matmul_rows(3328, 32, 768, 3072, 5, dtype)]
    title = "The experts' matmul, forward+backward, four ways (ms; ratios over one GEMM)"
    section("expert_matmul", title, matmuls)
    if args.smoke:
        train = train_rows(4, 16, dtype, peak, name="V-MoE-Nano/4")
    else:
        train = train_rows(128, 224, dtype, peak, name="V-MoE-B/16", moe_layers="every-2")
    columns = ["model", "step ms", "img/s", "TFLOP/s (XLA count)", "MFU", "step / ViT step"]
    section("train", "Train step (SGD)", train, columns)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
