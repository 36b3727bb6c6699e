#!/usr/bin/env bash
# The GPU runs of the benchmark, in one go: random weights of the real Qwen2.5-VL-7B architecture, on one GPU,
# in under 9 minutes: 4-bit NF4 (the default on CUDA) decoded eagerly and compiled (static KV cache, CUDA graphs)
# side by side on the same loaded model, then the other ways to load it decoded compiled only (torchao int4,
# bf16; fp8 on request), to say which is fastest compiled. See bench/RESULTS.md.
#
# Made for an offline GPU machine whose image may lack the pinned libraries (e.g. torch 2.11 with CUDA 13,
# an older transformers, no bitsandbytes, no torchao, no PyAV, no network). Before copying the repository there,
# here, in the repo root:
#
#     bash bench/fetch_wheels.sh     # transformers 5.23.0, bitsandbytes 0.50.2, torchao 0.18.0, regex -> bench/wheels/
#
# then run it there with bench/wheels/ copied along (about 58 MiB; it is gitignored, so a copy of the repository's
# tracked files alone lacks it: send the folder explicitly), on one H200 (the introduction target is stated for one
# H200):
#
#     OUT=/some/folder bash bench/gpu_run.sh      # within a 540 s budget
#
# On a machine that runs one command under a wall-clock limit, kills the whole script when it is reached and sends
# back only what is under $OUT, set BENCH_TOTAL_S to about that limit minus 40 s: the default, 540, is for a limit
# of 580 s or more.
#
# Each configuration (nf4, int4, bf16, fp8) writes results.json, results.md, latency.png, log.txt and progress.json
# to $RUNS/<configuration>/ (BENCH_RUNS, default /tmp/ego-bench-runs), its results as each part is measured. While
# a configuration runs (every BENCH_COPY_EVERY_S seconds, default 15) and once it ends, $OUT (default bench/out/gpu)
# gets <configuration>/results.json (its progress.json while it has no results.json yet) and all.tar.gz, every file
# of this call's configurations so far, each written whole under another name and then renamed: a script killed in
# the middle of a configuration leaves what that configuration had measured. At most five files, for a machine
# that sends back only a few (unpack with `tar xzf all.tar.gz`).
# A configuration measured eagerly and compiled (BENCH_EAGER, default "nf4") compiles the decode step after its
# eager measurement (inductor, mode reduce-overhead: the compile time and the recompilations are in results.json's
# meta.compile); results.json holds both (`decoding_runs`,
# `decoding_comparison`, and `decoding_equality`: the first 16 greedy tokens and logits of compiled against
# eager), its top level the compiled run (meta.decoding "compiled"). The other configurations load, compile and
# measure compiled decoding only (their eager figures are not candidates: bf16's were measured on 2026-11-26).
# TORCH_LOGS=recompiles puts the reason of any recompilation in the log.
# BENCH_CONFIGS (default "nf4 int4 bf16"; also "fp8"; "nf4" alone gives the 4-bit run all the time) chooses the
# configurations, in order: the first, the target setting, gets all the time it needs but BENCH_RESERVE_S
# (default 0; with compiled decoding its warm-up compiles two graphs, one row's steps (photos, clips and the size
# question's continuation) and batches', whose cost with inductor on the 7B model is what the run measures), and
# each later one what the earlier ones left. A failure in one does not stop the others.
# Time limits (seconds), through the environment: BENCH_TOTAL_S (the whole script, default 540: under 9
# minutes), BENCH_BUILD_LIMIT_S (building the 16.6 GB random-weight folder, default 150). BENCH_REPEATS (measured
# calls per scenario, default 2), BENCH_EAGER_REPEATS (those of the eager run measured beside compiled, default 1:
# its figures are the point of comparison, measured with 5 on 2026-11-26), BENCH_CONCEPTS (concepts introduced for
# real, default 5; the rest up to 20 are copies) and BENCH_PROFILE (the configurations whose compiled run is profiled, default none; "nf4" adds about a
# minute) trade detail for GPU time. A second call on the same warm machine reuses the random-weight folder the
# first one built.
# BENCH_CONCURRENCY (the configurations that also measure 1, 4 and 8 visitors asking at the same moment, batched
# and one at a time, and 8 visitors following up together: results.json's concurrent_1/4/8 and follow_ups_8,
# default "nf4", the target's setting) adds about a minute and a half
# to that configuration; it runs after its other results are written and before its profile.
#
# A rehearsal on a CPU (a scaled-down Qwen2.5-VL, the default's family, whose photo and clip inputs differ as the
# 7B's do; quick sizes, this machine's packages; int4 and fp8 load only on CUDA; on 2 busy cores give it
# BENCH_TOTAL_S=2400), e.g.:
#     OUT=/tmp/gpu-rehearsal BENCH_DEVICE=cpu BENCH_MODEL=qwen2.5-vl-3b BENCH_SKIP_WHEELS=1 BENCH_FORCE_AVSTUB=1 \
#         BENCH_CONFIGS="nf4 bf16" BENCH_ARCH_ARGS="--text-layers 1 --vision-depth 1" \
#         BENCH_ARGS="--quick --compile-backend aot_eager" bash bench/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench/out/gpu}"
RUNS="${BENCH_RUNS:-/tmp/ego-bench-runs}"
TOTAL="${BENCH_TOTAL_S:-540}"
BUILD_LIMIT="${BENCH_BUILD_LIMIT_S:-150}"
RESERVE="${BENCH_RESERVE_S:-0}"
REPEATS="${BENCH_REPEATS:-2}"
EAGER_REPEATS="${BENCH_EAGER_REPEATS:-1}"
CONCEPTS="${BENCH_CONCEPTS:-5}"
PROFILE="${BENCH_PROFILE-}"
CONCURRENCY="${BENCH_CONCURRENCY-nf4}"
CONFIGS="${BENCH_CONFIGS:-nf4 int4 bf16}"
EAGER="${BENCH_EAGER-nf4}"
MODEL="${BENCH_MODEL:-qwen2.5-vl-7b}"
DEVICE="${BENCH_DEVICE:-cuda}"
ARCH_ARGS="${BENCH_ARCH_ARGS:-}"      # e.g. "--text-layers 1 --vision-depth 1" (both commands get it)
BENCH_ARGS="${BENCH_ARGS:-}"          # e.g. "--quick"
ARCH_DIR="${BENCH_ARCH_DIR:-/tmp/ego-arch/$MODEL}"
PYTHON="${PYTHON:-python3}"
COPY_EVERY="${BENCH_COPY_EVERY_S:-15}"
mkdir -p "$OUT" "$RUNS"
# torchao's int4 runs on PyTorch's own kernels (tinygemm); its compiled extensions, built for another torch,
# are not loaded.
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_LOGS="${TORCH_LOGS-recompiles}"
started=$(date +%s)

# 1. The pinned libraries, from the carried wheels (no index, no dependencies: the image has the rest).
if [ -n "${BENCH_SKIP_WHEELS:-}" ]; then
    echo "BENCH_SKIP_WHEELS is set: using this machine's packages"
elif ls bench/wheels/*.whl >/dev/null 2>&1; then
    # torchao goes to a folder of its own, on the path of the int4 run only: transformers imports it for every
    # quantized model once it is installed, and a torchao that fails to import on this machine's torch must not
    # take the NF4 run down with it.
    # regex too is installed on its own: its wheel is for one CPython (3.12, the image's), and a wheel pip refuses
    # fails the whole install it is part of; the image's own regex then serves (transformers 5.17 needs the same).
    wheels=$(ls bench/wheels/*.whl | grep -v -e '/torchao-' -e '/regex-')
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ego-site \
        $wheels || { echo "installing bench/wheels failed"; exit 1; }
    if ls bench/wheels/regex-*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ego-site \
            bench/wheels/regex-*.whl || echo "the regex wheel does not suit this Python: using the image's regex"
    fi
    if ls bench/wheels/torchao-*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/ego-torchao bench/wheels/torchao-*.whl || echo "installing torchao failed: no int4 run"
    fi
    export PYTHONPATH="/tmp/ego-site:${PYTHONPATH:-}"
elif [ "$DEVICE" = cuda ]; then
    # The GPU image lacks the pinned transformers and bitsandbytes: without them NF4 and int4 fail and bf16 runs on
    # another transformers, a run wasted. bench/wheels/ is gitignored: it must be sent along explicitly.
    echo "bench/wheels/ is empty: run bench/fetch_wheels.sh and send bench/wheels/ along, or set"
    echo "BENCH_SKIP_WHEELS=1 on a machine that has the pinned packages"
    exit 1
else
    echo "bench/wheels/ is empty: using this machine's own transformers and bitsandbytes"
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
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
df -h /tmp | tail -1 || true
"$PYTHON" - <<'EOF' || { echo "environment check failed"; exit 1; }
import importlib.metadata as m, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print("torch", torch.__version__, "cuda", torch.version.cuda, gpu)
print("transformers", transformers.__version__, "from", transformers.__file__)
for name in ("huggingface-hub", "tokenizers", "safetensors", "regex", "accelerate"):  # transformers checks them
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "missing")
try:
    import bitsandbytes
    print("bitsandbytes", m.version("bitsandbytes"))
except Exception as error:  # the bf16 run still works without it
    print("bitsandbytes unavailable:", error)
EOF
PYTHONPATH="/tmp/ego-torchao:$PYTHONPATH" "$PYTHON" - <<'EOF' || echo "torchao does not import here: the int4 run will fail"
import torchao, transformers.quantizers.auto  # noqa: F401  (what loading any quantized model imports)
print("torchao", torchao.__version__)
EOF
"$PYTHON" - <<'EOF' || { echo "importing ego.engine failed: no configuration can run"; exit 1; }
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
    timeout -k 10 "$BUILD_LIMIT" "$PYTHON" -m ego.random_models.architectures "$MODEL" "$ARCH_DIR" --device "$DEVICE" \
        $ARCH_ARGS || { echo "building the architecture failed or timed out"; exit 1; }
    touch "$BUILT"
fi
du -sh "$ARCH_DIR" || true
echo "== built after $(( $(date +%s) - started ))s"

# 4. The configurations (BENCH_CONFIGS), in order; each has its own time limit, taken from what is left of TOTAL
#    (the first keeps RESERVE for the others), and a failure in one does not stop the others.
ran=""  # this call's configurations: all.tar.gz holds these, not the folders an earlier call left in $RUNS

# $OUT/<name>/ gets the configuration's results.json, or its progress.json until it has one (a compiled-only
# configuration writes its results at its end), and $OUT/all.tar.gz every file of this call's configurations.
# Each is written under another name, then renamed: a script killed meanwhile leaves the last whole one.
publish() {
    local name="$1" file=""
    if [ -f "$RUNS/$name/results.json" ]; then
        file=results.json
    elif [ -f "$RUNS/$name/progress.json" ]; then
        file=progress.json
    fi
    if [ -n "$file" ]; then
        mkdir -p "$OUT/$name" && cp "$RUNS/$name/$file" "$OUT/$name/.$file.part" \
            && mv -f "$OUT/$name/.$file.part" "$OUT/$name/$file"
        [ "$file" = results.json ] && rm -f "$OUT/$name/progress.json"
    fi
    # log.txt grows while tar reads it, which tar reports with status 1: the archive is whole all the same.
    # shellcheck disable=SC2086  # ran is a word list on purpose
    tar czf "$OUT/.all.tar.gz.part" --exclude='*.part' -C "$RUNS" $ran 2>/dev/null
    if [ $? -le 1 ]; then mv -f "$OUT/.all.tar.gz.part" "$OUT/all.tar.gz"; else echo "== packing $RUNS failed"; fi
}

status=0
first="${CONFIGS%% *}"
for name in $CONFIGS; do
    case "$name" in
        nf4) quantization=4bit ;;
        int4) quantization=int4 ;;
        fp8) quantization=fp8 ;;
        bf16) quantization=none ;;
        *) echo "== unknown configuration $name (BENCH_CONFIGS takes nf4, int4, fp8 and bf16)"; status=1; continue ;;
    esac
    left=$(( TOTAL - ($(date +%s) - started) ))
    if [ "$name" = "$first" ]; then limit=$(( left - RESERVE - 5 )); else limit=$(( left - 5 )); fi
    if [ "$limit" -lt 30 ]; then echo "== $name skipped: ${limit}s left"; status=1; continue; fi
    rm -rf "${RUNS:?}/$name" && mkdir -p "$RUNS/$name"  # a rerun on a warm machine never sends an older run's files
    rm -f "$OUT/$name/results.json" "$OUT/$name/progress.json"
    ran="$ran $name"
    decoding="compiled"; case " $EAGER " in *" $name "*) decoding="both" ;; esac
    profile=""; case " $PROFILE " in *" $name "*) profile="--profile" ;; esac
    concurrency="--no-concurrency"; case " $CONCURRENCY " in *" $name "*) concurrency="" ;; esac
    echo "== $name (quantization $quantization, decoding $decoding, $REPEATS repeats, ${profile:-no profile}," \
         "${concurrency:-with concurrency}, limit ${limit}s)"
    # What the configuration has written goes to $OUT while it runs. Told to stop, the loop finishes the copy or
    # pack under way first: the final publish below never writes beside it.
    (
        sleeper=""
        trap '[ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null; exit 0' TERM
        while true; do
            sleep "$COPY_EVERY" &
            sleeper=$!
            wait "$sleeper"
            publish "$name"
        done
    ) &
    copier=$!
    path="$PYTHONPATH"; [ "$name" = int4 ] && path="/tmp/ego-torchao:$PYTHONPATH"
    # -k 10: a process that outlives the time limit's SIGTERM is killed 10 s later.
    # shellcheck disable=SC2086
    PYTHONPATH="$path" timeout -k 10 "$limit" "$PYTHON" -m bench --model "$MODEL" --arch-dir "$ARCH_DIR" \
        --quantization "$quantization" --device "$DEVICE" --decoding "$decoding" --repeats "$REPEATS" \
        --eager-repeats "$EAGER_REPEATS" --concepts "$CONCEPTS" $profile $concurrency \
        $ARCH_ARGS $BENCH_ARGS --out "$RUNS/$name" 2>&1 \
        | tee "$RUNS/$name/log.txt"
    code=${PIPESTATUS[0]}
    kill "$copier" 2>/dev/null
    wait "$copier" 2>/dev/null
    publish "$name"
    [ -f "$RUNS/$name/results.json" ] || echo "== $name wrote no results.json"
    [ "$code" -eq 0 ] || { echo "== $name exited with $code"; status=1; }
    echo "== $name done after $(( $(date +%s) - started ))s"
done
exit $status
