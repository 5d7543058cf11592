#!/usr/bin/env bash
# Every check of this project that needs a GPU, writing its outputs to one folder ($OUT, or
# gpu_check/ by default: summary.txt, device.txt and one text file per check).
#
#   tools/gpu_check.sh --prepare          # here, before sending the tree: copies the real MNIST
#                                         # and two CIFAR-10 files from ../shared/data into
#                                         # .device_data/ (git-ignored, about 62 MB: carry it)
#   tools/gpu_check.sh [PART ...]         # on the GPU machine: the parts named, in this order,
#                                         # or all four
#   tools/gpu_check.sh --smoke [PART ...] # the same plumbing on the CPU with tiny sizes
#
# The parts, most important first (a lent GPU's time is short: a call may run `tests bench` and a
# second one `mnist cifar`; each part's output is written as it finishes, so a call cut short
# still returns the parts before it):
#   tests  the CUDA tests (tests/test_cuda.py): counter streams equal on CPU and GPU, the
#          CUDA-graph step equals the eager and the compiled steps, seeded runs repeat bit for
#          bit, a killed run resumes exactly, tf32/bf16 keep float32 state;
#   bench  benchmark.py for the three nets (plain, eager, fast fp32/tf32/bf16; ms per step,
#          ratios, projected full-run minutes);
#   mnist  the full 250-epoch `python mnist.py` on the real MNIST files (8000 of the 10000 test
#          images);
#   cifar  short real-data CIFAR-10 runs (9000 training images of data_batch_1, 1000 for
#          validation, 8000 test images) in fp32 and in bf16.
# DATA (default .device_data) is where --prepare copies to and the checks read from.
set -u
cd "$(dirname "$0")/.."
DATA=${DATA:-.device_data}
OUT=${OUT:-gpu_check}
SCRATCH=${TMPDIR:-/tmp}/gpu_check_runs
export PYTHONUNBUFFERED=1

if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
    sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
if [ "${1:-}" = "--prepare" ]; then
    src=${SHARED_DATA:-../shared/data}
    mkdir -p "$DATA/mnist" "$DATA/cifar10"
    cp "$src"/mnist/*.gz "$DATA/mnist/" &&
        cp "$src/cifar10/data_batch_1.npz" "$src/cifar10/test_batch_8000.npz" "$DATA/cifar10/" ||
        { echo "error: could not copy the real data from $src (see its README files)"; exit 2; }
    du -sh "$DATA"
    exit 0
fi
smoke=
if [ "${1:-}" = "--smoke" ]; then
    smoke=--smoke
    shift
fi
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests bench mnist cifar)
for part in "${parts[@]}"; do
    case $part in
        tests|bench|mnist|cifar) ;;
        *) echo "error: unknown part '$part'; the parts are tests, bench, mnist, cifar (see --help)"; exit 2 ;;
    esac
done
wants() { [[ " ${parts[*]} " == *" $1 "* ]]; }

mkdir -p "$OUT" "$SCRATCH"
rm -rf "${SCRATCH:?}"/*
PY=${PYTHON:-python3}
$PY -c "import torch, numpy, scipy" 2>/dev/null || { echo "error: $PY cannot import torch, numpy and scipy (set PYTHON=...)"; exit 2; }
summary="$OUT/summary.txt"
touch "$summary"
note() { echo "$*" | tee -a "$summary"; }

if [ -n "$smoke" ]; then
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
note "device: $(tail -1 "$OUT/device.txt"); parts: ${parts[*]}"

if wants tests; then
    start=$SECONDS
    timeout 240 $PY -m pytest -q -p no:cacheprovider "${tests[@]}" > "$OUT/pytest.txt" 2>&1
    note "tests: CUDA tests ($((SECONDS - start)) s): $(tail -1 "$OUT/pytest.txt")"
fi

if wants bench; then
    start=$SECONDS
    timeout 330 $PY benchmark.py "${bench[@]}" > "$OUT/benchmark.txt" 2>&1
    note "bench: benchmark.py ($((SECONDS - start)) s, compiling included):"
    grep -E "^(SUMMARY|  (plain|eager|fast))" "$OUT/benchmark.txt" | tee -a "$summary"
fi

if wants mnist; then
    start=$SECONDS
    timeout 240 $PY mnist.py --data_dir="$DATA/mnist" --verify_checksums=False --device=$device \
        --out_dir="$SCRATCH/mnist" "${mnist[@]}" > "$OUT/mnist.txt" 2>&1
    note "mnist: mnist.py, 250 epochs unless --smoke ($((SECONDS - start)) s, compiling included): $(tail -1 "$OUT/mnist.txt")"
    grep -E "^Epoch (1|10|50|100|150|200|250) of" -A4 "$OUT/mnist.txt" | grep -E "^Epoch|validation error" | paste - - >> "$summary"
fi

if wants cifar; then
    $PY tools/cifar10_subset.py "$DATA/cifar10" "$SCRATCH/cifar10" "${subset[@]}" > /dev/null \
        || note "cifar: the CIFAR-10 subset could not be written from $DATA/cifar10"
    for precision in fp32 bf16; do
        start=$SECONDS
        timeout 150 $PY cifar10.py --data_dir="$SCRATCH/cifar10" --verify_checksums=False \
            --device=$device --precision=$precision \
            --out_dir="$SCRATCH/cifar10-$precision" "${cifar[@]}" > "$OUT/cifar10_$precision.txt" 2>&1
        note "cifar: cifar10.py $precision ($((SECONDS - start)) s): $(tail -1 "$OUT/cifar10_$precision.txt")"
        grep -E "^Epoch [0-9]+ of .* took" "$OUT/cifar10_$precision.txt" | tail -3 >> "$summary"
    done
fi
note "outputs in $OUT"
