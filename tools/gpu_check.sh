#!/usr/bin/env bash
# Every check of this project that needs a GPU, each one asserting: PASS or FAIL per check, with
# the wall time of each part, in one summary ($OUT/summary.txt; $OUT is gpu_check/ by default),
# and one text file of output per check beside it.
#
#   tools/gpu_check.sh --prepare          # here, before sending the tree: copies the real MNIST
#                                         # and two CIFAR-10 files from ../shared/data into
#                                         # .device_data/ (git-ignored, about 62 MB: carry it)
#   tools/gpu_check.sh [PART ...]         # on the GPU machine: the parts named, in this order,
#                                         # or all four
#   tools/gpu_check.sh --smoke [PART ...] # the same plumbing on the CPU with tiny sizes
#
# The parts, most important first. Each has its own time limit, and together they fit one
# 8-minute call on an H100/H200 (or `tests bench`, then `mnist cifar`: two of at most 5 minutes);
# each part's verdict is written as it finishes, so a call cut short keeps the parts before it.
#   tests  (100 s) the CUDA tests (tests/test_fast_step_cuda.py), the graph-mode resume first: a run killed
#          mid-epoch in graph mode resumes bit-exact, with no guard firing; the graph step equals
#          the compiled step (to tests/test_fast_step.py's tolerance) and the eager one; counter
#          streams equal the CPU's; seeded runs repeat; tf32/bf16 keep float32 state. PASS: all
#          of them pass.
#   bench  (110 s) benchmark.py for MNIST (plain, eager, fast fp32/tf32/bf16, fp32 without the
#          deterministic modes) and CIFAR-10 (fp32, bf16): ms per step, ratios, projected minutes.
#          PASS: every fast step beats the plain step.
#   mnist  (3 min) the full 250-epoch `python mnist.py` on the real MNIST files (8000 of the 10000
#          test images). PASS: 250 epochs, finite losses, the test error at the best epoch in
#          [0.9, 1.6] % (the lasagne README's ~1.15 %; an earlier eager run of ours: 1.33 %).
#   cifar  (90 s) real-data CIFAR-10 (9000 training images of data_batch_1, 1000 for
#          validation, 8000 test images), 2 epochs in each of fp32, tf32 and bf16. PASS: each
#          finishes with finite losses.
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
failed=0
verdict() {  # PART SECONDS STATUS WHAT: one PASS/FAIL line of the summary
    local word=PASS
    [ "$3" -eq 0 ] || { word=FAIL; failed=$((failed + 1)); }
    note "$word $1 ($2 s): $4"
}
# A finished run: its epochs all in metrics.jsonl, finite losses, and with LOW HIGH its test
# error at the best epoch in [LOW, HIGH] %. Prints what it found; exit status 1 if it falls short.
check_run() {  # RUN_DIR EPOCHS [LOW HIGH]
    $PY - "$@" <<'PYEOF'
import json, math, sys
run, epochs = sys.argv[1], int(sys.argv[2])
try:
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
except OSError as e:
    sys.exit(print(f"no metrics.jsonl ({e.strerror})") or 1)
last = rows[-1] if rows else {}
said = (f"{len(rows)} of {epochs} epochs; best epoch {last.get('best_epoch')}: validation "
        f"{last.get('best_val_err')} %, test {last.get('test_err')} %")
losses = [r[k] for r in rows for k in ("train_loss", "val_loss", "test_loss")]
ok = len(rows) == epochs and all(v is not None and math.isfinite(v) for v in losses)
if ok and len(sys.argv) > 3:
    low, high = map(float, sys.argv[3:5])
    ok = low <= last["test_err"] <= high
    said += f" (band [{low}, {high}] %)"
print(said)
sys.exit(0 if ok else 1)
PYEOF
}

if [ -n "$smoke" ]; then
    device=cpu
    bench=(--nets=mnist --steps=2 --repeats=1 --device=cpu --precisions=fp32 --set num_units=256)
    bench2=()
    mnist=(--num_units=64 --num_epochs=2)
    mnist_epochs=2 mnist_band=()
    cifar=(--num_epochs=1 --train_set_size=250 --compile=false)
    # tf32 is fp32 on a CPU, and bf16 emulated (slow) on CPUs without bf16 instructions
    cifar_epochs=1 precisions=(fp32)
    subset=(--limit=300)
    tests=(tests/test_fast_step_cuda.py)
    limits=(240 240 240 240)
else
    device=cuda
    bench=(--nets=mnist --steps=30 --repeats=2 --precisions=fp32,tf32,bf16 --autotune)
    bench2=(--nets=cifar10 --steps=20 --repeats=2 --precisions=fp32,bf16)
    mnist=()
    mnist_epochs=250 mnist_band=(0.9 1.6)
    cifar=(--num_epochs=2 --train_set_size=9000)
    cifar_epochs=2 precisions=(fp32 tf32 bf16)
    subset=()
    tests=(-m cuda tests/test_fast_step_cuda.py)
    limits=(100 110 180 90)  # seconds: 8 minutes in all
fi

{ date; nvidia-smi 2>&1 | head -15; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"; } > "$OUT/device.txt" 2>&1
note "device: $(tail -1 "$OUT/device.txt"); parts: ${parts[*]}"

if wants tests; then
    start=$SECONDS
    timeout "${limits[0]}" $PY -m pytest -q -p no:cacheprovider "${tests[@]}" > "$OUT/pytest.txt" 2>&1
    rc=$?
    verdict tests $((SECONDS - start)) $rc "CUDA tests: $(tail -1 "$OUT/pytest.txt")"
fi

if wants bench; then
    start=$SECONDS
    half=$((limits[1] / (${#bench2[@]} ? 2 : 1)))
    { timeout $half $PY benchmark.py "${bench[@]}" &&
        { [ ${#bench2[@]} -eq 0 ] || timeout $half $PY benchmark.py "${bench2[@]}"; }; } \
        > "$OUT/benchmark.txt" 2>&1
    rc=$?
    # every fast step faster than the plain step
    slow=$(grep -oE "ratio_fast[a-z0-9_]*=[0-9.]+" "$OUT/benchmark.txt" | awk -F= '$2 <= 1' | tr '\n' ' ')
    [ $rc -eq 0 ] && [ -z "$slow" ] && grep -q "^SUMMARY" "$OUT/benchmark.txt"
    rc=$?
    verdict bench $((SECONDS - start)) $rc "benchmark.py, compiling included${slow:+; not faster than plain: $slow}"
    grep -E "^(SUMMARY|  (plain|eager|fast))" "$OUT/benchmark.txt" | tee -a "$summary"
fi

if wants mnist; then
    start=$SECONDS
    timeout "${limits[2]}" $PY mnist.py --data_dir="$DATA/mnist" --verify_checksums=False --device=$device \
        --out_dir="$SCRATCH/mnist" "${mnist[@]}" > "$OUT/mnist.txt" 2>&1
    found=$(check_run "$SCRATCH/mnist" $mnist_epochs "${mnist_band[@]}")
    rc=$?
    verdict mnist $((SECONDS - start)) $rc "mnist.py, $mnist_epochs epochs, compiling included: $found"
    grep -E "^Epoch (1|10|50|100|150|200|250) of" -A4 "$OUT/mnist.txt" | grep -E "^Epoch|validation error" | paste - - >> "$summary"
fi

if wants cifar; then
    $PY tools/cifar10_subset.py "$DATA/cifar10" "$SCRATCH/cifar10" "${subset[@]}" > /dev/null \
        || note "cifar: the CIFAR-10 subset could not be written from $DATA/cifar10"
    per=$((limits[3] / ${#precisions[@]}))
    for precision in "${precisions[@]}"; do
        start=$SECONDS
        timeout $per $PY cifar10.py --data_dir="$SCRATCH/cifar10" --verify_checksums=False \
            --device=$device --precision=$precision \
            --out_dir="$SCRATCH/cifar10-$precision" "${cifar[@]}" > "$OUT/cifar10_$precision.txt" 2>&1
        found=$(check_run "$SCRATCH/cifar10-$precision" $cifar_epochs)
        rc=$?
        verdict "cifar-$precision" $((SECONDS - start)) $rc "cifar10.py $precision: $found"
        grep -E "^Epoch [0-9]+ of .* took" "$OUT/cifar10_$precision.txt" | tail -3 >> "$summary"
    done
fi
note "gpu_check: $failed check(s) failed; outputs in $OUT"
[ $failed -eq 0 ]
