"""GPU timing of rnnjac.fixed_points (issue: H=512, 4096 initial states sampled from trajectories).

Run on a CUDA machine: ``python analyses/gpu_fixed_points.py``; prints a markdown table (float64, the
default Newton/Levenberg-Marquardt solver, tol q <= 1e-10, zero input; recurrent weights x2.5 as in
``benchmark_fixed_points.py``).
"""

import sys
import time

import torch
from torch import nn

import rnnjac


def main():
    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    hidden, n = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (512, 4096)
    rows = []
    for arch in ("gru", "lstm"):
        torch.manual_seed(0)
        model = (nn.GRU if arch == "gru" else nn.LSTM)(3, hidden, batch_first=True).double()
        with torch.no_grad():
            model.weight_hh_l0.mul_(2.5)
        model = model.to(dev)
        x = torch.randn(64, 100, 3, dtype=torch.float64, device=dev, generator=None)
        with torch.no_grad():
            traj = rnnjac.trajectory(model, x)
        g = torch.Generator(device="cpu").manual_seed(0)
        pick = torch.randperm(traj.shape[0] * (traj.shape[1] - 1), generator=g)[:n]
        s0 = traj[:, 1:].reshape(-1, traj.shape[-1])[pick.to(dev)]
        for _rep in range(2):  # the first run includes CUDA/cuSOLVER start-up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            ds = rnnjac.fixed_points(model, None, s0, outlier_distance=None)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        conv = int(ds.converged.values.sum()) if "converged" in ds else -1
        rows.append(
            f"| {arch.upper()} H={hidden} | {n} | {dt:.2f} | {ds.attrs.get('iterations', '?')} | {conv} | "
            f"{int(ds.is_fixed_point.values.sum())} | {float(ds.q.values.max()) if ds.sizes['fixed_point'] else float('nan'):.1e} |"
        )
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, float64, second of two runs\n")
    print("| model | initial states | time [s] | iterations | searches converged | fixed points | max q |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
