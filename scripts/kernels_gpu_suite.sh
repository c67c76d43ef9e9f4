#!/usr/bin/env bash
# The CUDA kernels' measurements on one GPU machine (H100/H200), phase by phase, into one folder:
#
#     bash scripts/kernels_gpu_suite.sh OUT PHASE...        # e.g. OUT build tests mid large
#
#   build  kernels/build.sh (with ONNXQF_KERNELS_DEPS=pack where the machine has no network: kernels/README.md);
#          the later phases use that library
#   tests  the GPU tests (kernels/tests) and the lowering's tests (KT=expr: pytest -k)
#   mid    16-528 rows: the default rule, rule 1 and tiles 3, 9-12 (gemv_ab.py -> OUT/mid.json), then
#          tile_rule_check.py on it (docs/benchmarks.md g17)
#   large  2048 rows, device times: the quantization's grid (ONNXQF_QUANT_PIPE) and the GEMM as a dependent launch
#          (OUT/large.json)
#   table  issue 19's per-linear table: M = 1, 16, 2048 with the defaults, device times (OUT/table.json)
#   asym   the asymmetric codes against the symmetric ones per linear, M = 1, 16, 2048 (onnxqf bench --linears:
#          onnxqf-cuda and onnxqf-cuda:asymmetric=true against FP16; OUT/asym.txt)
#   e2e    the model builder's 8-layer Llama-2-7B-shaped genai folder, FP16 against onnxqf's W8A8 and hybrid
#          rewrites through the kernels (OUT/e2e; BUILDER=the builder's staged folder, genai_gpu_bench.py
#          stage-builder; REWRITES to choose; SEQ, default 2048 tokens of prefill)
#
# Needs onnxruntime-gpu and PyTorch (IOBinding timings, the profiler's device times). ONNXQF_KERNELS, when set, names
# the library for every phase but build. Each phase prints its time; a failed phase does not stop the next.
set -uo pipefail
[ $# -ge 2 ] || { echo "usage: bash scripts/kernels_gpu_suite.sh OUT PHASE... (phases: build tests mid large table asym e2e)" >&2; exit 2; }
out=$1
shift
mkdir -p "$out"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
shapes=4096:4096,11008:4096,4096:11008
ab() { "$py" scripts/gemv_ab.py --shapes "$shapes" --copies 8 --repeats 6 "$@"; }
status=0
for phase in "$@"; do
  t0=$(date +%s)
  case $phase in
    build)
      bash kernels/build.sh && export ONNXQF_KERNELS=$root/kernels/build/libonnxqf_kernels.so ;;
    tests)
      "$py" -m pytest -q kernels/tests tests/test_cuda_kernels_lowering.py ${KT:+-k "$KT"} 2>&1 | tail -25 ;;
    mid)
      ab --m 16,32,64,128,192,264,396,528 --rounds 2 --out "$out/mid.json" --settings \
        "rule=;rule1=ONNXQF_GEMM_RULE=1;t3=ONNXQF_GEMM_TILE=3;t9=ONNXQF_GEMM_TILE=9;t10=ONNXQF_GEMM_TILE=10;t11=ONNXQF_GEMM_TILE=11;t12=ONNXQF_GEMM_TILE=12;t9pdl=ONNXQF_GEMM_TILE=9,ONNXQF_GEMM_PDL=1" &&
        "$py" scripts/tile_rule_check.py "$out/mid.json" --rules 0,1 ;;
    large)
      ab --m 2048 --rounds 3 --kernels --out "$out/large.json" --settings \
        "rule=;pipe1=ONNXQF_QUANT_PIPE=1;pipe2=ONNXQF_QUANT_PIPE=2;pdl=ONNXQF_GEMM_PDL=1;pipe1pdl=ONNXQF_QUANT_PIPE=1,ONNXQF_GEMM_PDL=1" ;;
    table)
      ab --m 1,16,2048 --rounds 3 --kernels --out "$out/table.json" --settings "onnxqf=" ;;
    asym)
      "$py" -m onnxqf.cli bench --linears "$shapes" --m 1,16,2048 --ep cuda --dtype float16 --copies 8 --repeats 30 \
        --lowerings onnxqf-cuda,onnxqf-cuda:asymmetric=true 2>&1 | tee "$out/asym.txt" | tail -20 ;;
    e2e)
      [ -n "${BUILDER:-}" ] || { echo "e2e: set BUILDER to the builder's staged folder (genai_gpu_bench.py stage-builder)" >&2; false; } &&
        "$py" scripts/genai_gpu_bench.py run --ep cuda --layers 8 --seq "${SEQ:-2048}" --past 512 --builder "$BUILDER" \
          --out "$out/e2e" --budget "${E2EBUDGET:-330}" --work "${WORK:-/dev/shm/onnxqf_e2e}" --builders float \
          --cuda-graph --rewrite-limit 200 \
          --rewrites "${REWRITES:-onnxqf W8A8 kernels + lm_head,onnxqf hybrid W8A8 kernels + lm_head}" 2>&1 | tail -40 ;;
    *)
      echo "unknown phase $phase (phases: build tests mid large table asym e2e)" >&2; false ;;
  esac
  rc=$?
  [ $rc -eq 0 ] || status=$rc
  echo "== $phase: exit $rc, $(( $(date +%s) - t0 )) s"
done
exit $status
