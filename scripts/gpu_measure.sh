#!/usr/bin/env bash
# The GPU measurements of issue #15 in one go, for a machine with a CUDA device and no internet: run from the
# repository root (`bash scripts/gpu_measure.sh`); everything it writes goes under "$OUT" (default ./gpu_out).
# Budget: at most about 9 minutes of wall time (HARDMINE_GPU_BUDGET seconds, default 540); every step has its
# own `timeout`, so one stuck step cannot eat the rest, and a failed step does not stop the others.
#
# What the caller brings (copied into the checkout before the run; both are in .gitignore, so a tool that copies
# the working tree must be told to take them, e.g. carry: ["wheels", "data"]):
#   wheels/   wheels for what the device machine may lack (about 21 MB), installed (into a temporary folder
#             put on PYTHONPATH, not into its Python) only when the module does not import. faiss is needed by
#             every scan; pytest and hypothesis by the host-sync tests. Download them with internet:
#               pip download --only-binary=:all: --no-deps --python-version 3.12 \
#                 --platform manylinux_2_28_x86_64 -d wheels faiss-cpu packaging \
#                 pytest pluggy iniconfig pygments hypothesis attrs sortedcontainers
#             (3.12: the Python of the H200 machine lent so far; the script prints the one it finds first.
#             faiss-cpu's wheel is abi3, for any CPython >= 3.10; wheels for several Pythons may lie side by
#             side: pip picks the one that fits).
#   data/fashion-mnist/   train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz (make install puts them
#             in /usr/share/datasets/fashion-mnist), for the 60k demo scan. $HARDMINE_FASHION_MNIST, when
#             set, wins; without the files the demo scans are skipped (the synthetic scan still runs).
#
# Steps, in this order (results as JSON + Markdown under $OUT, never in scripts/results/):
#   host_syncs      pytest tests/test_host_syncs.py (its test_on_a_gpu_* tests run only with a CUDA device)
#                   -> host_syncs.xml
#   callbacks_b256  scripts/bench_callbacks.py --device cuda (mlp, cnn, transformer), batch 256; its methods
#                   on a GPU include last_layer_graphs / multi_layer_graphs (OnlineMiner(cuda_graphs=True))
#   callbacks_b1024 the same at batch 1024 -> bench_callbacks_b{256,1024}.{json,md}
#   conv_routes     scripts/bench_conv_routes.py: the Conv2d rule's grouped and unfold routes timed on this device
#                   (ResNet-like layers too) -> conv_routes_cuda.{json,md}
#   extract_cnn_split  the CNN at batch 2048 with the rules' large float32 products split into bfloat16 pieces
#                   (--split-products; hardmine.factored.registry.SPLIT_DEVICES) -> bench_extract_cnn_split.{json,md}
#   extract_resnet18_split  the same for ResNet-18 at batch 512 -> bench_extract_resnet18_split.{json,md}
#   extract_cnn_chunks  the CNN at batch 2048 with the rules' chunk budget at 2^26 elements (--chunk-elements;
#                   the library's is 2^22) -> bench_extract_cnn_chunks.{json,md}
#   extract_b256    scripts/bench_extract.py --device cuda --methods train_step,factored,factored_graphs
#                   (factored_graphs: GradientExtractor(cuda_graphs=True)), batch 256
#   extract_b2048   the same at batch 2048 -> bench_extract_b{256,2048}.{json,md}
#   extract_resnet18  the same for ResNet-18 (torchvision's architecture, conv + fc selected) at batch 512
#                   -> bench_extract_resnet18.{json,md}
#   scan_cuda       scripts/bench_scan.py --device cuda: synthetic 100k + the Fashion-MNIST demo (60k),
#                   median of 3 fresh processes each -> bench_scan_cuda.{json,md}
#   scan_cuda_graphs  the demo scan again with --cuda-graphs, one process -> bench_scan_cuda_graphs.{json,md}
#   profile         scripts/profile_extract.py: torch.profiler tables of one factored batch beside one train
#                   step (mlp b2048, cnn and transformer b256, resnet18 b512) -> profile/prof_*.txt, profile.json
#   scan_host_cpu   scripts/bench_scan.py --device cpu, the demo only: the same scan on this machine's CPU,
#                   for the CPU-vs-GPU comparison -> bench_scan_host_cpu.{json,md}
#   dispatch_cpu    scripts/bench_dispatch.py on this machine's CPU (kernel ops per step, the CPU proxy of
#                   the host's share of a GPU step), to set beside the kernel launches per step the GPU rows
#                   record (host_syncs_per_*): the proxy's calibration -> bench_dispatch_host_cpu.{json,md}
# plus env.txt (Python, torch, device, faiss, commit), one <step>.log per step and gpu_measure.log (all of it).
# The device tool brings back at most 8 files from its $OUT: give the script another folder and pack it, e.g.
#   D=$OUT; OUT=/tmp/g bash scripts/gpu_measure.sh; rc=$?; tar czf "$D/gpu.tgz" -C /tmp/g .; exit $rc
#
# A dry run on a machine without a GPU (every command line runs once, tiny sizes, one thread, ~1 minute):
#   HARDMINE_GPU_DEVICE=cpu HARDMINE_GPU_QUICK=1 OUT=/tmp/gpu_dry bash scripts/gpu_measure.sh
# (HARDMINE_GPU_FORCE_WHEELS=1 installs every wheel above even where the module imports: a check of wheels/;
# PYTHON=... picks the interpreter, default python3.)

set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT" || exit 2
exec > >(tee -a "$OUT/gpu_measure.log") 2>&1

DEVICE=${HARDMINE_GPU_DEVICE:-cuda}
QUICK=${HARDMINE_GPU_QUICK:-0}
BUDGET=${HARDMINE_GPU_BUDGET:-540}
PY=${PYTHON:-$(command -v python3 || command -v python)}
START=$(date +%s)
SUMMARY=""
FAILED=0

if [ "$QUICK" = 1 ]; then
    # The dry run: tiny sizes on one thread (the numbers mean nothing; the command lines are what it checks).
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
fi

# ------------------------------------------------------------------------------------------ environment
echo "== gpu_measure $(date -u '+%Y-%m-%d %H:%M UTC'), device $DEVICE, quick $QUICK, budget ${BUDGET}s, out $OUT"
"$PY" -V
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no CUDA device)")'
command -v nvidia-smi >/dev/null && nvidia-smi -L

# Wheels for what does not import, into a folder of their own (the machine's Python stays as it is; no
# internet: --no-index, only the carried wheels).
DEPS=${TMPDIR:-/tmp}/hardmine_gpu_deps
missing=""
for pair in faiss:faiss-cpu packaging:packaging pytest:pytest pluggy:pluggy iniconfig:iniconfig \
            pygments:pygments hypothesis:hypothesis attr:attrs sortedcontainers:sortedcontainers; do
    if [ "${HARDMINE_GPU_FORCE_WHEELS:-0}" = 1 ] || ! "$PY" -c "import ${pair%%:*}" 2>/dev/null; then
        missing="$missing ${pair#*:}"
    fi
done
if [ -n "$missing" ]; then
    echo "not importable here:$missing; installing from $ROOT/wheels into $DEPS"
    if ls "$ROOT"/wheels/*.whl >/dev/null 2>&1; then
        # shellcheck disable=SC2086  # one argument per distribution
        "$PY" -m pip install --quiet --no-deps --no-index --find-links "$ROOT/wheels" --upgrade --target "$DEPS" $missing \
            || "$PY" - "$ROOT/wheels" "$DEPS" $missing <<'EOF' || echo "WARNING: could not install all of:$missing (steps needing them will fail)"
# No pip, or it refused: a wheel is a zip file laid out for site-packages; unpack the one for this Python.
import re, sys, zipfile
from pathlib import Path

wheels, deps, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
missing = []
for name in names:
    stem = re.sub(r"[-_.]+", "_", name).lower()
    fits = [w for w in sorted(wheels.glob("*.whl")) if w.name.lower().split("-")[0] == stem
            and ("-none-any" in w.name or (("-abi3-" in w.name or f"-{tag}-" in w.name) and "x86_64" in w.name))]
    if fits:
        zipfile.ZipFile(fits[-1]).extractall(deps)
        print("unpacked", fits[-1].name)
    else:
        missing.append(name)
sys.exit(f"no wheel for {tag} of {missing}" if missing else 0)
EOF
    else
        echo "WARNING: no wheels/*.whl in the checkout: the steps needing$missing will fail"
    fi
fi
export PYTHONPATH="$DEPS:$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # hardmine from this checkout, no install

# The Fashion-MNIST files: $HARDMINE_FASHION_MNIST, else data/fashion-mnist in the checkout, else the
# library's default folder.
if [ -z "${HARDMINE_FASHION_MNIST:-}" ] && [ -d "$ROOT/data/fashion-mnist" ]; then
    export HARDMINE_FASHION_MNIST="$ROOT/data/fashion-mnist"
fi
if "$PY" -c 'from hardmine.datasets import fashion_mnist_dir, find_idx_pair; print("Fashion-MNIST:", *find_idx_pair(fashion_mnist_dir()))'; then
    DEMO=""
else
    DEMO="--no-demo"
    echo "WARNING: no Fashion-MNIST train files (set HARDMINE_FASHION_MNIST or carry data/fashion-mnist): demo scans skipped"
fi

{
    "$PY" -V
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no CUDA device)")'
    "$PY" -c 'import faiss; print("faiss", faiss.__version__)'
    "$PY" -c 'import hardmine; print("hardmine", hardmine.__version__, "from", hardmine.__file__)'
    echo "commit $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo ' (with local changes)')"
    echo "cpus $(getconf _NPROCESSORS_ONLN)"
    echo "HARDMINE_FASHION_MNIST=${HARDMINE_FASHION_MNIST:-} demo=${DEMO:-yes}"
} > "$OUT/env.txt" 2>&1
tail -n +3 "$OUT/env.txt"  # Python and torch were printed first

# ------------------------------------------------------------------------------------------------ steps
# step NAME LIMIT COMMAND...: runs COMMAND under `timeout` (never past what is left of the budget), its output
# in $OUT/NAME.log (last lines echoed), and records passed / FAILED / TIMED OUT for the summary.
step() {
    local name=$1 limit=$2 left rc t0 dt status
    shift 2
    left=$(( BUDGET - ($(date +%s) - START) - 5 ))
    if [ "$left" -lt 15 ]; then
        SUMMARY="$SUMMARY$(printf '%-22s %-18s' "$name" 'SKIPPED (budget)')"$'\n'
        FAILED=$((FAILED + 1))
        echo "== $name: skipped, ${left}s of the budget left"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (timeout ${limit}s): $*"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    case $rc in
        0) status=passed ;;
        124|137) status="TIMED OUT" ;;
        *) status="FAILED (rc $rc)" ;;
    esac
    [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
    tail -n 8 "$OUT/$name.log"
    echo "== $name: $status in ${dt}s"
    SUMMARY="$SUMMARY$(printf '%-22s %-18s %4ss' "$name" "$status" "$dt")"$'\n'
}

if [ "$QUICK" = 1 ]; then
    SCAN=(--n 3000 --repeats 1 --no-neighbor-scores --threads 1)
    HOST_SCAN=(--repeats 1 --no-neighbor-scores --threads 1)
    GRAPH_SCAN=(--repeats 1 --no-neighbor-scores --threads 1)
    EXTRACT=(--target-dim 64 --min-time 0 --min-iters 1 --warmup-time 0 --repeats 1 --threads 1)
    B_SMALL=8 B_LARGE=16 B_RESNET=8
    CALLBACKS=(--min-time 0 --min-rounds 2 --warmup 1 --threads 1)
    C_SMALL=8 C_LARGE=16
else
    SCAN=(--n 100000 --repeats 3 --no-neighbor-scores)  # the neighbour scores and their recall run on the host
    HOST_SCAN=(--repeats 1)  # the host's CPU: one process (three took over the step's limit on an H200 host)
    GRAPH_SCAN=(--repeats 1 --no-neighbor-scores)
    # One process for all rows (--no-isolate): on a GPU the peak memory is the device's own count, reset per
    # row, and a fresh process per row would spend the budget starting CUDA.
    EXTRACT=(--min-time 2 --warmup-time 1 --repeats 2)
    B_SMALL=256 B_LARGE=2048 B_RESNET=512  # ResNet-18 at 512, as the issue measured it
    CALLBACKS=(--min-time 3 --min-rounds 10 --warmup 4)  # the graphed methods capture in round 3
    C_SMALL=256 C_LARGE=1024
fi
DEVTYPE=${DEVICE%%:*}  # cuda:1 -> cuda

# Most wanted first, so a run cut short by the budget loses the least: the GPU tests (the new code's
# correctness), the online miner with and without CUDA graphs, the conv routes, the split products, then the rows
# measured before.
step host_syncs 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_host_syncs.py \
    --junitxml="$OUT/host_syncs.xml"
for b in "$C_SMALL" "$C_LARGE"; do
    step callbacks_b$b 60 "$PY" scripts/bench_callbacks.py --device "$DEVICE" --models mlp,cnn,transformer \
        --batch "$b" "${CALLBACKS[@]}" --out "$OUT/bench_callbacks_b$b.json"
done
# The conv rule's two routes on this device (a GPU takes the unfold one until this shows the grouped one pays)
ROUTES=(--repeats 5)
[ "$QUICK" = 1 ] && ROUTES=(--repeats 1 --batch 8)
step conv_routes 45 "$PY" scripts/bench_conv_routes.py --device "$DEVICE" "${ROUTES[@]}" \
    --out "$OUT/conv_routes_$DEVTYPE.json"
# The CNN at batch 2048 (0.62x with graphs on the H200) and ResNet-18 at 512 (0.71x) with the rules' large
# float32 products as bfloat16 tensor-core products of three-piece splits (--split-products: exact to float32
# rounding, the agreement line says how close): where the device time of these two goes. Each row set has
# its own train_step, so the ratio stands without the later steps.
step extract_cnn_split 45 "$PY" scripts/bench_extract.py --device "$DEVICE" --models cnn \
    --methods train_step,factored,factored_graphs --batch "$B_LARGE" --no-isolate "${EXTRACT[@]}" \
    --split-products --out "$OUT/bench_extract_cnn_split.json"
step extract_resnet18_split 60 "$PY" scripts/bench_extract.py --device "$DEVICE" --models resnet18 \
    --methods train_step,factored,factored_graphs --batch "$B_RESNET" --no-isolate "${EXTRACT[@]}" \
    --split-products --out "$OUT/bench_extract_resnet18_split.json"
# The CNN at batch 2048 (0.62x with graphs on the H200) with the rules' chunk budget raised from 2^22 to 2^26
# elements: at 2048 its convolutions run as about sixty chunks of small kernels. Whether fewer, larger ones pay
# on a GPU decides a device-dependent budget.
step extract_cnn_chunks 45 "$PY" scripts/bench_extract.py --device "$DEVICE" --models cnn \
    --methods train_step,factored,factored_graphs --batch "$B_LARGE" --no-isolate "${EXTRACT[@]}" \
    --chunk-elements $((1 << 26)) --out "$OUT/bench_extract_cnn_chunks.json"
for b in "$B_SMALL" "$B_LARGE"; do
    step extract_b$b 90 "$PY" scripts/bench_extract.py --device "$DEVICE" --methods train_step,factored,factored_graphs \
        --batch "$b" --no-isolate "${EXTRACT[@]}" --out "$OUT/bench_extract_b$b.json"
done
step extract_resnet18 60 "$PY" scripts/bench_extract.py --device "$DEVICE" --models resnet18 \
    --methods train_step,factored,factored_graphs --batch "$B_RESNET" --no-isolate "${EXTRACT[@]}" \
    --out "$OUT/bench_extract_resnet18.json"
# The issue's pipeline criterion: (index + score) / extract of the same scan, the demo at 60k.
# shellcheck disable=SC2086  # $DEMO: no word or one flag
step scan_$DEVTYPE 120 "$PY" scripts/bench_scan.py --device "$DEVICE" "${SCAN[@]}" $DEMO \
    --json-out "$OUT/bench_scan_$DEVTYPE.json"
# The demo scan again with --cuda-graphs (one process): what the graphs change in a whole scan.
if [ -z "$DEMO" ]; then
    step scan_${DEVTYPE}_graphs 60 "$PY" scripts/bench_scan.py --device "$DEVICE" --n "${GRAPH_SCAN[@]}" --cuda-graphs \
        --json-out "$OUT/bench_scan_${DEVTYPE}_graphs.json"
fi
PROFILE=()
[ "$QUICK" = 1 ] && PROFILE=(--quick --warmup 1 --batches 1)
step profile 40 "$PY" scripts/profile_extract.py --device "$DEVICE" "${PROFILE[@]}" --out-dir "$OUT/profile"
if [ -z "$DEMO" ]; then
    # --n with no size: no synthetic series, the demo only
    step scan_host_cpu 60 "$PY" scripts/bench_scan.py --device cpu --n "${HOST_SCAN[@]}" \
        --json-out "$OUT/bench_scan_host_cpu.json"
else
    SUMMARY="$SUMMARY$(printf '%-22s %-18s' scan_host_cpu 'SKIPPED (no data)')"$'\n'
    FAILED=$((FAILED + 1))  # the demo is the issue's criterion: a run without it is incomplete
fi
DISPATCH=(--rounds 5)  # each round RECORD_EVERY (16) steps per row
[ "$QUICK" = 1 ] && DISPATCH=(--quick)
step dispatch_cpu 30 "$PY" scripts/bench_dispatch.py "${DISPATCH[@]}" --out "$OUT/bench_dispatch_host_cpu.json"

# ---------------------------------------------------------------------------------------------- summary
echo
echo "== summary ($(( $(date +%s) - START ))s of ${BUDGET}s; files in $OUT)"
printf '%s' "$SUMMARY"
"$PY" - "$OUT" <<'EOF' || true
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for path in sorted(out.glob("bench_scan_*.json")):
    res = json.loads(path.read_text())
    for r in res["runs"]:
        print(f"{path.name}: {r['series']} N={r['n']:,} on {res['settings'].get('device', 'cpu')}: extract "
              f"{r['extract_s']:.2f}s, (index + score) / extract {r['pipeline_over_extract']:.2f} "
              f"(runs {r.get('repeat_pipeline_over_extract')}; target <= 0.5)")
def by_batch(paths):  # b256 before b2048
    return sorted(paths, key=lambda p: (len(p.name), p.name))


for path in by_batch(out.glob("bench_extract_*.json")):
    for r in json.loads(path.read_text()):
        if r["method"] in ("factored", "factored_graphs"):
            print(f"{path.name}: {r['model']} {r['method']} / train_step {r['ratio_to_train_step']:.2f}")
for path in by_batch(out.glob("bench_callbacks_b*.json")):
    for r in json.loads(path.read_text())["rows"]:
        if r["method"] != "plain":
            print(f"{path.name}: {r['model']} {r['method']} {r['ratio_to_plain']:.2f}x a plain step")
EOF
echo "== $FAILED step(s) did not pass"
[ "$FAILED" -eq 0 ]
