#!/usr/bin/env bash
# The GPU runs of the benchmark, in one go: random weights of the real Qwen2.5-VL-7B architecture,
# 4-bit NF4 (the default on CUDA) and bf16, each decoded eagerly and compiled (static KV cache, CUDA graphs)
# side by side on the same loaded model, on one GPU, in under 9 minutes. See bench/RESULTS.md.
#
# Made for an offline GPU machine whose image may lack the pinned libraries (e.g. torch 2.11 with CUDA 13,
# an older transformers, no bitsandbytes, no PyAV, no network). Before copying the repository there, here, in
# the repo root:
#
#     bash bench/fetch_wheels.sh     # transformers 5.23.0, bitsandbytes 0.50.2, regex -> bench/wheels/ (gitignored)
#
# then run it there with bench/wheels/ copied along (about 55 MiB), on one H200 (the introduction target is
# stated for one H200):
#
#     OUT=/some/folder bash bench/gpu_run.sh      # within a 540 s budget
#
# Outputs go to $OUT:
#     $OUT/nf4/{results.json,results.md,latency.png,log.txt}  and  $OUT/bf16/{...}
# Anywhere else it writes to bench/out/gpu/. Each configuration measures eager decoding, then compiles the
# decode step (inductor, mode reduce-overhead: the compile time and the recompilations are in results.json's
# meta.compile) and measures compiled decoding; results.json holds both (`decoding_runs`, `decoding_comparison`,
# and `decoding_equality`: the first 16 greedy tokens and logits of compiled against eager), its top level the
# compiled run (meta.decoding "compiled"). TORCH_LOGS=recompiles puts the reason of any recompilation in the log.
# Time limits (seconds), through the environment: BENCH_TOTAL_S (the whole script, default 540: under 9
# minutes), BENCH_BUILD_LIMIT_S (building the 16.6 GB random-weight folder, default 150), BENCH_BF16_RESERVE_S
# (kept for the bf16 run, default 0). The 4-bit run, the target setting, goes first and gets the rest of the
# time: with compiled decoding its warm-up compiles five graphs (a photo's, a clip's and the size question's
# steps, and batched photos and clips), whose cost with inductor on the 7B model is what the run measures, so bf16
# (which only says whether another precision would be faster) gets what the 4-bit run leaves. BENCH_REPEATS (measured calls per scenario, default 2), BENCH_CONCEPTS (concepts introduced for real,
# default 5; the rest up to 20 are copies) and BENCH_PROFILE (the configurations whose compiled run is
# profiled, default none; "nf4" adds about a minute) trade detail for GPU time.
# BENCH_CONFIGS (default "nf4 bf16"; "nf4" alone gives the 4-bit run all the time) chooses the configurations; a
# second call on the same warm machine reuses the random-weight folder the first one built.
# BENCH_CONCURRENCY (the configurations that also measure 1, 4 and 8 visitors asking at the same moment, batched
# and one at a time: results.json's concurrent_1/4/8, default "nf4", the target's setting) adds about a minute
# to that configuration; it runs after its other results are written and before its profile.
#
# A rehearsal on a CPU (scaled-down 2B architecture, quick sizes, this machine's packages), e.g.:
#     OUT=/tmp/gpu-rehearsal BENCH_DEVICE=cpu BENCH_MODEL=qwen2-vl-2b BENCH_SKIP_WHEELS=1 BENCH_FORCE_AVSTUB=1 \
#         BENCH_ARCH_ARGS="--text-layers 1 --vision-depth 1" BENCH_ARGS="--quick --compile-backend aot_eager" \
#         bash bench/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench/out/gpu}"
TOTAL="${BENCH_TOTAL_S:-540}"
BUILD_LIMIT="${BENCH_BUILD_LIMIT_S:-150}"
BF16_RESERVE="${BENCH_BF16_RESERVE_S:-0}"
REPEATS="${BENCH_REPEATS:-2}"
CONCEPTS="${BENCH_CONCEPTS:-5}"
PROFILE="${BENCH_PROFILE-}"
CONCURRENCY="${BENCH_CONCURRENCY-nf4}"
CONFIGS="${BENCH_CONFIGS:-nf4 bf16}"
MODEL="${BENCH_MODEL:-qwen2.5-vl-7b}"
DEVICE="${BENCH_DEVICE:-cuda}"
ARCH_ARGS="${BENCH_ARCH_ARGS:-}"      # e.g. "--text-layers 1 --vision-depth 1" (both commands get it)
BENCH_ARGS="${BENCH_ARGS:-}"          # e.g. "--quick"
ARCH_DIR="${BENCH_ARCH_DIR:-/tmp/ego-arch/$MODEL}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT/nf4" "$OUT/bf16"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_LOGS="${TORCH_LOGS-recompiles}"
started=$(date +%s)

# 1. The pinned libraries, from the carried wheels (no index, no dependencies: the image has the rest).
if [ -n "${BENCH_SKIP_WHEELS:-}" ]; then
    echo "BENCH_SKIP_WHEELS is set: using this machine's packages"
elif ls bench/wheels/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ego-site \
        bench/wheels/*.whl || { echo "installing bench/wheels failed"; exit 1; }
    export PYTHONPATH="/tmp/ego-site:${PYTHONPATH:-}"
else
    echo "bench/wheels/ is empty: using the machine's own transformers and bitsandbytes"
    echo "(run bench/fetch_wheels.sh before sending this script)"
fi

# 2. ego/media.py imports PyAV at module level. The benchmark passes its video as decoded frames, so PyAV is
#    never called; where it is missing, a stand-in module lets `import ego.media` succeed (no file is decoded).
if [ -n "${BENCH_FORCE_AVSTUB:-}" ] || ! "$PYTHON" -c "import av" >/dev/null 2>&1; then
    mkdir -p /tmp/ego-avstub/av
    cat > /tmp/ego-avstub/av/__init__.py <<'EOF'
"""Stand-in for PyAV on a machine without it: the benchmark never decodes a video file."""
time_base = 1000000


def open(*args, **kwargs):  # noqa: A001 - the name PyAV uses
    raise RuntimeError("PyAV is not installed on this machine; pass video frames as an array instead")
EOF
    if [ -n "${BENCH_FORCE_AVSTUB:-}" ]; then
        export PYTHONPATH="/tmp/ego-avstub:${PYTHONPATH:-}"
    else
        export PYTHONPATH="${PYTHONPATH:-}:/tmp/ego-avstub"
    fi
fi
export PYTHONPATH="${PYTHONPATH}:$(pwd)"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
df -h /tmp | tail -1 || true
"$PYTHON" - <<'EOF' || { echo "environment check failed"; exit 1; }
import importlib.metadata as m, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print("torch", torch.__version__, "cuda", torch.version.cuda, gpu)
print("transformers", transformers.__version__, "from", transformers.__file__)
try:
    import bitsandbytes
    print("bitsandbytes", m.version("bitsandbytes"))
except Exception as error:  # the bf16 run still works without it
    print("bitsandbytes unavailable:", error)
import av, ego.engine  # noqa: F401  (imports everything the benchmark needs)
print("PyAV", getattr(av, "__version__", "stand-in"))
EOF

# 3. The random-weight folder of the real architecture, built once on the GPU in bf16, used by both runs. A folder
#    a previous call on the same (still warm) machine finished is reused: its marker is written after the build.
BUILT="$ARCH_DIR/.built-with-${ARCH_ARGS// /_}"
if [ -f "$BUILT" ]; then
    echo "== reusing $MODEL's architecture in $ARCH_DIR"
else
    echo "== building $MODEL's architecture in $ARCH_DIR (limit ${BUILD_LIMIT}s)"
    rm -rf "$ARCH_DIR"
    # shellcheck disable=SC2086  # ARCH_ARGS / BENCH_ARGS are word lists on purpose
    timeout "$BUILD_LIMIT" "$PYTHON" -m ego.random_models.architectures "$MODEL" "$ARCH_DIR" --device "$DEVICE" \
        $ARCH_ARGS || { echo "building the architecture failed or timed out"; exit 1; }
    touch "$BUILT"
fi
du -sh "$ARCH_DIR" || true
echo "== built after $(( $(date +%s) - started ))s"

# 4. The configurations (BENCH_CONFIGS), 4-bit first (the targets' setting), each eager then compiled; each has
#    its own time limit, taken from what is left of TOTAL, and a failure in one does not stop the other.
status=0
for name in $CONFIGS; do
    case "$name" in
        nf4) quantization=4bit ;;
        bf16) quantization=none ;;
        *) echo "== unknown configuration $name (BENCH_CONFIGS takes nf4 and bf16)"; status=1; continue ;;
    esac
    left=$(( TOTAL - ($(date +%s) - started) ))
    case " $CONFIGS " in
        *" bf16 "*) [ "$name" = nf4 ] && limit=$(( left - BF16_RESERVE - 5 )) || limit=$(( left - 5 )) ;;
        *) limit=$(( left - 5 )) ;;
    esac
    if [ "$limit" -lt 30 ]; then echo "== $name skipped: ${limit}s left"; status=1; continue; fi
    profile=""; case " $PROFILE " in *" $name "*) profile="--profile" ;; esac
    concurrency="--no-concurrency"; case " $CONCURRENCY " in *" $name "*) concurrency="" ;; esac
    echo "== $name (quantization $quantization, eager and compiled, $REPEATS repeats, ${profile:-no profile}," \
         "${concurrency:-with concurrency}, limit ${limit}s)"
    # shellcheck disable=SC2086
    timeout "$limit" "$PYTHON" -m bench --model "$MODEL" --arch-dir "$ARCH_DIR" --quantization "$quantization" \
        --device "$DEVICE" --decoding both --repeats "$REPEATS" --concepts "$CONCEPTS" $profile $concurrency \
        $ARCH_ARGS $BENCH_ARGS --out "$OUT/$name" 2>&1 \
        | tee "$OUT/$name/log.txt"
    code=${PIPESTATUS[0]}
    [ "$code" -eq 0 ] || { echo "== $name exited with $code"; status=1; }
    echo "== $name done after $(( $(date +%s) - started ))s"
done
exit $status
