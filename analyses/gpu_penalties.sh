#!/usr/bin/env bash
# Issue 14 on a lent GPU, as one device call (about 7 minutes on an H100): a smoke check that stops early, the
# CUDA tests, then the penalty benchmark of the issue (H=256/512, B=64, T=200; eagerly, then with compile=True).
# Tables and logs go to $OUT (the device tool's output folder; /tmp/gpu_out elsewhere).
#   bash analyses/gpu_penalties.sh
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # packages the device image lacks (h5netcdf), carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi -L
python3 - <<'PY' || { echo "smoke check failed: stopping"; exit 3; }
import torch, rnnjac
from rnnjac.regularizers import forward_with_states, jacobian_penalty
print("torch", torch.__version__, torch.cuda.get_device_name())
for cls in (torch.nn.GRU, torch.nn.LSTM):
    m = cls(4, 16, num_layers=2, batch_first=True).cuda().eval()
    x = torch.randn(3, 7, 4, device="cuda")
    out, states = forward_with_states(m, x)
    (out.sum() + jacobian_penalty(m, x, states=states)).backward()
    print(cls.__name__, "ok", float(m.weight_hh_l0.grad.norm()))
PY
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_input_output_penalty.py \
  tests/test_lyapunov_vectors.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
cd analyses || exit 1
# sized for one 15-minute device lease (~6 minutes here): the Lyapunov rows (~1 s a step on a GPU: a sequential
# chain of small kernels) and the compiled rows (6-21 s to compile per penalty and size) only where they tell most
common=(--device cuda --steps 200 --repeat 3)
timeout 150 python3 benchmark_regularizers.py "${common[@]}" --hidden 256 512 --layers 1 2 --exact-stacked-max 256 \
  --penalties exact spectral projection --out "$OUT/benchmark_regularizers_gpu.md" > "$OUT/eager.log" 2>&1
echo "eager benchmark rc=$?"
timeout 60 python3 benchmark_regularizers.py "${common[@]}" --hidden 256 --layers 1 --penalties lyapunov \
  --out "$OUT/benchmark_regularizers_gpu_lyapunov.md" > "$OUT/lyapunov.log" 2>&1
echo "lyapunov benchmark rc=$?"
timeout 120 python3 benchmark_regularizers.py "${common[@]}" --hidden 256 --layers 1 --compile --penalties exact bfloat16 \
  --out "$OUT/benchmark_regularizers_gpu_compile.md" > "$OUT/compile.log" 2>&1
echo "compile benchmark rc=$?"
grep -h "^|" "$OUT"/benchmark_regularizers_gpu*.md | cut -c1-150
