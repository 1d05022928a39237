"""Times qat's fake-quantize forward and forward+backward against PyTorch's own ops and
against the memory-bandwidth floor (copying the same tensor into a preallocated one),
all measured side by side in one run.

    .venv/bin/python benchmarks/bench_fake_quantize.py [--elements 4194304] [--threads 2]

Targets (issue 2): forward <= 1.5x one copy, forward+backward <= 1.5x two copies, for
ste and lsq, per-tensor and per-channel. Issue 3: the fused observe + fake-quantize op
(moving-average observer) faster than torch.fused_moving_avg_obs_fake_quant. The ratios are the result; absolute times
depend on the machine and its load.
"""

import argparse

import torch

import qat
from _timing import keep_freed_memory, round_robin_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="tell glibc to keep freed memory (a tuning trick, see "
                             "keep_freed_memory; off by default: users' processes have the "
                             "default allocator)")
    args = parser.parse_args()
    malloc = "default allocator"
    if args.keep_freed_memory:
        malloc = ("glibc keeping freed memory (--keep-freed-memory)" if keep_freed_memory()
                  else "default allocator (mallopt failed)")
    if args.elements < 64 * 64 or args.elements % 64:
        parser.error("--elements must be a multiple of 64, at least 4096")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    channels = 64
    # NCHW-like activations: per-channel quantization along axis 1.
    shape = (4, channels, args.elements // (4 * channels))
    x = torch.randn(shape)
    grad = torch.randn(shape)
    dst = torch.empty_like(x)
    qmin, qmax = -128, 127

    per_tensor_scale = torch.tensor([x.abs().max().item() / 127])
    per_tensor_zp = torch.zeros(1, dtype=torch.int32)
    per_channel_scale = x.abs().amax(dim=(0, 2)) / 127
    per_channel_zp = torch.zeros(channels, dtype=torch.int32)

    timed = {"copy": lambda: dst.copy_(x)}

    def forward_backward(make_output, leaves):
        def step():
            for leaf in leaves:
                leaf.grad = None
            make_output().backward(grad)

        return step

    xr = x.clone().requires_grad_()
    cases = []
    for granularity in ("per-tensor", "per-channel"):
        per_channel = granularity == "per-channel"
        scale = per_channel_scale if per_channel else per_tensor_scale
        zp = per_channel_zp if per_channel else per_tensor_zp
        axis = 1 if per_channel else None
        for estimator in ("ste", "lsq"):
            s = scale.clone().requires_grad_(estimator == "lsq")
            leaves = [xr, s] if estimator == "lsq" else [xr]

            def ours(s=s, zp=zp, axis=axis, estimator=estimator):
                return qat.fake_quantize(xr, s, zp, qmin, qmax, axis, estimator, 1.0)

            if estimator == "ste" and per_channel:
                def aten(s=s, zp=zp):
                    return torch.fake_quantize_per_channel_affine(xr, s, zp, 1, qmin, qmax)
            elif estimator == "ste":
                def aten(s=s, zp=zp):
                    return torch.fake_quantize_per_tensor_affine(xr, s, zp, qmin, qmax)
            elif per_channel:
                zpf = zp.float()

                def aten(s=s, zpf=zpf):
                    return torch._fake_quantize_learnable_per_channel_affine(
                        xr, s, zpf, 1, qmin, qmax, 1.0)
            else:
                zpf = zp.float()

                def aten(s=s, zpf=zpf):
                    return torch._fake_quantize_learnable_per_tensor_affine(
                        xr, s, zpf, qmin, qmax, 1.0)

            assert torch.equal(ours(), aten()), f"{granularity} {estimator}: forward differs"
            case = f"{granularity} {estimator}"
            cases.append(case)
            timed[(case, "ours_fwd")] = ours
            timed[(case, "aten_fwd")] = aten
            timed[(case, "ours_fb")] = forward_backward(ours, leaves)
            timed[(case, "aten_fb")] = forward_backward(aten, leaves)

    # Fused moving-average observer + fake quantization, training forward, affine uint8
    # (PyTorch's fused op computes symmetric qparams with other formulas than its
    # observers, while qat follows the observers). PyTorch's op takes per-channel
    # statistics along axis 0 only, so that case puts the channels first.
    fused_cases = []
    on = torch.ones(1, dtype=torch.long)
    for granularity in ("per-tensor", "per-channel"):
        per_channel = granularity == "per-channel"
        xf = (x.transpose(0, 1).contiguous() if per_channel else x).requires_grad_()
        size = channels if per_channel else 1
        axis = 0 if per_channel else None
        state_ours = [torch.full((size,), float("inf")), torch.full((size,), float("-inf")),
                      torch.ones(size), torch.zeros(size, dtype=torch.int32)]
        state_aten = [t.clone() for t in state_ours]

        def fused_ours(xf=xf, st=state_ours, axis=axis):
            return torch.ops.qat.fused_observe_fake_quantize(
                xf, st[0], st[1], st[2], st[3], 0, 255, axis, 0.01, False)

        def fused_aten(xf=xf, st=state_aten, per_channel=per_channel):
            return torch.fused_moving_avg_obs_fake_quant(
                xf, on, on, st[0], st[1], st[2], st[3], 0.01, 0, 255, 0, per_channel, False)

        # PyTorch's per-channel scales are computed in double and may differ by one float32
        # ulp, which can move an element by one step.
        y_ours, y_aten = fused_ours(), fused_aten()
        torch.testing.assert_close(state_ours[2], state_aten[2], rtol=1e-6, atol=0)
        assert torch.equal(state_ours[3], state_aten[3]), f"fused {granularity}: zero point"
        assert ((y_ours - y_aten).abs() <= state_ours[2].max() * 1.001).all(), granularity
        fused_cases.append(granularity)
        timed[(granularity, "fused_ours")] = fused_ours
        timed[(granularity, "fused_aten")] = fused_aten

    ms = {name: median for name, (median, _) in round_robin_ms(timed, args.repeats).items()}
    copy_ms = ms["copy"]

    print(f"qat {qat.__version__}, torch {torch.__version__}, {x.numel()} float32 elements "
          f"({x.numel() * 4 / 2**20:.0f} MiB), {args.threads} threads, "
          f"CPU kernels: {qat._C._cpu_capability()}, median of {args.repeats}, {malloc}")
    print(f"copy into a preallocated tensor (floor): {copy_ms:.3f} ms")
    header = (f"{'case':<22}{'qat fwd':>9}{'ATen fwd':>10}{'fwd/copy':>10}{'ATen/qat':>10}"
              f"{'qat f+b':>9}{'ATen f+b':>10}{'f+b/2copy':>11}{'ATen/qat':>10}")
    print(header)
    for case in cases:
        t = {kind: ms[(case, kind)] for kind in ("ours_fwd", "aten_fwd", "ours_fb", "aten_fb")}
        print(f"{case:<22}"
              f"{t['ours_fwd']:>9.3f}{t['aten_fwd']:>10.3f}"
              f"{t['ours_fwd'] / copy_ms:>10.2f}{t['aten_fwd'] / t['ours_fwd']:>10.1f}"
              f"{t['ours_fb']:>9.3f}{t['aten_fb']:>10.3f}"
              f"{t['ours_fb'] / (2 * copy_ms):>11.2f}{t['aten_fb'] / t['ours_fb']:>10.1f}")
    print("targets: fwd/copy <= 1.5, f+b/2copy <= 1.5 (times in ms)")
    print()
    print("fused moving-average observe + fake-quantize (training forward, affine uint8)")
    print(f"{'case':<22}{'qat':>9}{'ATen':>10}{'ATen/qat':>10}{'qat/copy':>10}")
    for granularity in fused_cases:
        ours_ms, aten_ms = ms[(granularity, "fused_ours")], ms[(granularity, "fused_aten")]
        print(f"{granularity:<22}{ours_ms:>9.3f}{aten_ms:>10.3f}{aten_ms / ours_ms:>10.1f}"
              f"{ours_ms / copy_ms:>10.2f}")
    print("target: ATen/qat > 1 (times in ms)")


if __name__ == "__main__":
    main()
