#!/usr/bin/env bash
# Every check of this project that needs a GPU, in one go (about 8 minutes on one H100), writing
# its outputs to one folder ($OUT, or gpu_check/ by default: 7 text files).
#
#   tools/gpu_check.sh --prepare    # here, before sending the tree: copies the real MNIST and
#                                   # two CIFAR-10 files from ../shared/data into .device_data/
#                                   # (git-ignored, about 62 MB: carry it with the call)
#   tools/gpu_check.sh              # on the GPU machine: the checks below
#   tools/gpu_check.sh --smoke      # the same plumbing on the CPU with tiny sizes (a rehearsal)
#
# 1. the CUDA tests (tests/test_cuda.py): counter streams equal on CPU and GPU, the CUDA-graph
#    step equals the eager and the compiled steps, seeded runs repeat bit for bit, a killed run
#    resumes exactly, tf32/bf16 keep float32 state;
# 2. benchmark.py for the three nets (plain, eager, fast fp32/tf32/bf16; ms per step, ratios,
#    projected full-run minutes);
# 3. the full 250-epoch `python mnist.py` on the real MNIST files (8000 of the 10000 test images);
# 4. short real-data CIFAR-10 runs (9000 training images of data_batch_1, 1000 for validation,
#    8000 test images) in fp32 and in bf16.
set -u
cd "$(dirname "$0")/.."
DATA=.device_data
OUT=${OUT:-gpu_check}
SCRATCH=${TMPDIR:-/tmp}/gpu_check_runs
export PYTHONUNBUFFERED=1

if [ "${1:-}" = "--prepare" ]; then
    src=../shared/data
    mkdir -p "$DATA/mnist" "$DATA/cifar10"
    cp "$src"/mnist/*.gz "$DATA/mnist/"
    cp "$src/cifar10/data_batch_1.npz" "$src/cifar10/test_batch_8000.npz" "$DATA/cifar10/"
    du -sh "$DATA"
    exit 0
fi
smoke=${1:-}
mkdir -p "$OUT" "$SCRATCH"
rm -rf "${SCRATCH:?}"/*
PY=${PYTHON:-python3}
$PY -c "import torch, numpy, scipy" 2>/dev/null || { echo "error: $PY cannot import torch, numpy and scipy (set PYTHON=...)"; exit 2; }
summary="$OUT/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

if [ "$smoke" = "--smoke" ]; then
    device=cpu
    bench=(--nets=mnist --steps=2 --repeats=1 --device=cpu)
    mnist=(--num_units=64 --num_epochs=2)
    cifar=(--num_epochs=1 --train_set_size=900 --compile=false)
    subset=(--limit=1000)
    tests=(tests/test_cuda.py)
else
    device=cuda
    bench=(--steps=30 --repeats=2)
    mnist=()
    cifar=(--num_epochs=15 --train_set_size=9000)
    subset=()
    tests=(-m cuda tests/test_cuda.py)
fi

{ date; nvidia-smi 2>&1 | head -15; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"; } > "$OUT/device.txt" 2>&1
note "device: $(tail -1 "$OUT/device.txt")"

start=$SECONDS
timeout 240 $PY -m pytest -q -p no:cacheprovider "${tests[@]}" > "$OUT/pytest.txt" 2>&1
note "1. CUDA tests ($((SECONDS - start)) s): $(tail -1 "$OUT/pytest.txt")"

start=$SECONDS
timeout 300 $PY benchmark.py "${bench[@]}" > "$OUT/benchmark.txt" 2>&1
note "2. benchmark ($((SECONDS - start)) s):"
grep -E "^(SUMMARY|  (plain|eager|fast))" "$OUT/benchmark.txt" | tee -a "$summary"

start=$SECONDS
timeout 240 $PY mnist.py --data_dir="$DATA/mnist" --verify_checksums=False --device=$device \
    --out_dir="$SCRATCH/mnist" "${mnist[@]}" > "$OUT/mnist.txt" 2>&1
note "3. mnist.py, 250 epochs unless --smoke ($((SECONDS - start)) s, compiling included): $(tail -1 "$OUT/mnist.txt")"
grep -E "^Epoch (1|10|50|100|150|200|250) of" -A4 "$OUT/mnist.txt" | grep -E "^Epoch|validation error" | paste - - >> "$summary"

$PY tools/cifar10_subset.py "$DATA/cifar10" "$SCRATCH/cifar10" "${subset[@]}" > /dev/null \
    || note "CIFAR-10 subset failed"
for precision in fp32 bf16; do
    start=$SECONDS
    timeout 150 $PY cifar10.py --data_dir="$SCRATCH/cifar10" --verify_checksums=False \
        --device=$device --precision=$precision \
        --out_dir="$SCRATCH/cifar10-$precision" "${cifar[@]}" > "$OUT/cifar10_$precision.txt" 2>&1
    note "4. cifar10.py $precision ($((SECONDS - start)) s): $(tail -1 "$OUT/cifar10_$precision.txt")"
    grep -E "^Epoch [0-9]+ of .* took" "$OUT/cifar10_$precision.txt" | tail -3 >> "$summary"
done
note "outputs in $OUT"
