#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# One call on the GPU machine: build from source (carried nvidia-cutlass wheel, no network),
# run the tests (CPU and CUDA), a compute-sanitizer pass, and the benchmarks.
#   scripts/gpu_check.sh [stage ...]     stages: build diagnose test sanitize native profile
#                                        profile-source (warp stalls per instruction)
#                                        profile-e2e (kernels of each phase of a decode step;
#                                        PROFILE_E2E_ARGS passed to scripts/profile_e2e_step.py)
#                                        bench-<name> (runs bench/bench_<name>.py)
#                                        base-bench-<name> (the same against the baseline
#                                        build of .base: an A/B run on one machine)
#                                        e2e-tp<N> (bench_e2e.py --tp N under torchrun)
#                                        weights (joins the real pair sent in slices, below)
#                                        quality-<context> (dustin eval at that context;
#                                        QUALITY_ARGS adds options, QUALITY_TAG names the files)
#                                        calibrate-<context> (dustin calibrate at that context)
#                                        (default: build test sanitize)
# The real GGUF pair reaches the machine in 48 MiB slices (`dustin fetch split FILE .weights`
# here), one call per slice copying it to ~/xfer; the `weights` stage joins them into the
# dustin cache (`dustin fetch join`), which verifies every SHA-256.
# Carry the wheel folder and the commit (`scripts/prepare_gpu_call.sh` writes .dustin-commit):
# run(carry=[".whl", ".dustin-commit"]) (a .git there, if any, is stale; results cite that commit).
# .whl holds the wheels the machine lacks: nvidia-cutlass and gguf (docs/gpu-notes.md).
# Logs and new bench/results files come back in $OUT/run.tgz (at most 8 files come back).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dustin-out}
LOGS=/tmp/dustin-logs
mkdir -p "$OUT" "$LOGS"
touch "$LOGS/.start"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test sanitize)
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export DUSTIN_CUDA=ON DUSTIN_CUDA_ARCHS=${DUSTIN_CUDA_ARCHS:-90a} DUSTIN_BUILD_JOBS=$(nproc)
status=0
[ -f .dustin-commit ] && export DUSTIN_COMMIT="$(cat .dustin-commit) (recorded in .dustin-commit)"

step() { echo; echo "=== $* ($(date +%T))"; }
# bench/bench_<name>.py with BENCH_ARGS_<name> (else BENCH_ARGS), e.g. BENCH_ARGS_e2e="--no-peers";
# its log is bench_<name><suffix>.log.
run_bench() {
  local args_var="BENCH_ARGS_$1"
  python3 "bench/bench_$1.py" ${!args_var:-${BENCH_ARGS:-}} 2>&1 | tee "$LOGS/bench_$1${2:-}.log" \
    || status=1
}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  # FlashInfer's modules prebuilt for sm_90a (a peer of bench_sparse_verify; docs/gpu-notes.md
  # says how they are made), unpacked where FlashInfer looks for AOT modules before compiling.
  for aot in .whl/flashinfer-*-aot-*.tar.gz; do
    [ -f "$aot" ] && [ -d /tmp/site/flashinfer/data ] && tar -xzf "$aot" -C /tmp/site/flashinfer/data/
  done
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true

for stage in "${stages[@]}"; do
  case "$stage" in
    build)
      step build
      # .base, when carried, holds the sources of the commit an A/B run compares against
      # (`scripts/prepare_gpu_call.sh BASE`): built alongside into /tmp/base-site for the
      # base-bench-<name> stages.
      if [ -d .base ]; then
        python3 -m pip install -q --no-build-isolation --no-deps --no-index \
          --target /tmp/base-site ./.base > "$LOGS/build_base.log" 2>&1 &
        base_pid=$!
      fi
      python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -n 30
      python3 -c "import dustin; assert dustin.built_with_cuda(), 'no CUDA kernels'; print('built with CUDA')" || exit 1
      if [ -n "${base_pid:-}" ]; then
        # A broken baseline fails the run but not this tree's stages.
        wait "$base_pid" && PYTHONPATH=/tmp/base-site:$PYTHONPATH python3 -c \
          "import dustin; print('baseline', open('.base/.dustin-commit').read().strip(), 'at', dustin.__file__)" \
          || { tail -n 30 "$LOGS/build_base.log"; rm -rf /tmp/base-site; status=1; }
      fi
      ;;
    diagnose)
      step diagnose; bash scripts/diagnose_crash.sh 2>&1 | tee "$LOGS/diagnose.log"
      ;;
    test)
      step tests
      xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
      # Eight workers on 16 cores: keep each worker's OpenMP pool small.
      # TESTS narrows the run, e.g. TESTS="tests/test_fast.py -k cuda".
      OMP_NUM_THREADS=2 python3 -m pytest -q -ra -p no:cacheprovider $xdist ${TESTS:-tests} \
        --junitxml="$LOGS/junit.xml" 2>&1 | tee "$LOGS/test.log" | tail -n 40 || status=1
      ;;
    sanitize)
      step compute-sanitizer
      for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 9 --target-processes all \
          python3 scripts/sanitize_case.py 2>&1 | tee -a "$LOGS/sanitize.log" | tail -n 15 || status=1
      done
      ;;
    native)
      step native
      DUSTIN_NATIVE_CUDA=ON python3 -m pytest -q -p no:cacheprovider tests/test_native.py || status=1
      ;;
    profile)
      # Nsight Compute on one launch per case (PROFILE_CASES: ';'-separated argument lists of
      # PROFILE_SCRIPT, whose kernels match PROFILE_KERNEL; default sparse_verify; for scoring:
      # PROFILE_SCRIPT=scripts/profile_block_scores.py PROFILE_KERNEL=block_scores_fragment;
      # selection: scripts/profile_select_blocks.py, select_blocks_kernel). PROFILE_SECTIONS
      # replaces the sections, PROFILE_METRICS (comma-separated) adds metrics.
      step profile
      script=${PROFILE_SCRIPT:-scripts/profile_sparse_verify.py}
      sections=${PROFILE_SECTIONS:-SpeedOfLight Occupancy LaunchStats WarpStateStats SchedulerStats MemoryWorkloadAnalysis}
      section_args=()
      for section in $sections; do section_args+=(--section "$section"); done
      [ -n "${PROFILE_METRICS:-}" ] && section_args+=(--metrics "$PROFILE_METRICS")
      IFS=';' read -ra cases <<< "${PROFILE_CASES:---budget 512;--budget 0}"
      for case in "${cases[@]}"; do
        echo "--- $case" | tee -a "$LOGS/profile.log"
        ncu --clock-control none -k "regex:${PROFILE_KERNEL:-sparse_verify_kernel}" -s 3 -c 1 \
          "${section_args[@]}" \
          python3 "$script" $case 2>&1 | tee -a "$LOGS/profile.log" \
          | grep -v "^==PROF==" | tail -n 120 || status=1
      done
      ;;
    profile-source)
      # Where the warps of one launch per case stall, instruction by instruction (same
      # PROFILE_SCRIPT, PROFILE_KERNEL and PROFILE_CASES as profile): the SASS with its
      # warp-state samples and stall reasons as CSV in the logs (the CUDA-source view of that
      # page carries no metrics), its top instructions printed by scripts/ncu_source_top.py.
      step "profile source"
      script=${PROFILE_SCRIPT:-scripts/profile_sparse_verify.py}
      IFS=';' read -ra cases <<< "${PROFILE_CASES:---budget 512;--budget 0}"
      n=0
      for case in "${cases[@]}"; do
        n=$((n + 1))
        echo "--- $case" | tee -a "$LOGS/profile_source.log"
        ncu --clock-control none -k "regex:${PROFILE_KERNEL:-sparse_verify_kernel}" -s 3 -c 1 \
          --section SourceCounters --section WarpStateStats --import-source yes \
          -f -o "/tmp/source_$n" python3 "$script" $case > /dev/null 2>&1 || status=1
        ncu -i "/tmp/source_$n.ncu-rep" --page source --csv --print-source sass \
          > "$LOGS/source_$n.csv" 2>&1
        python3 scripts/ncu_source_top.py "$LOGS/source_$n.csv" 2>&1 \
          | tee -a "$LOGS/profile_source.log" || status=1
        ncu -i "/tmp/source_$n.ncu-rep" --page details --section WarpStateStats 2>&1 \
          | grep -v "^==PROF==" | tail -n 40 | tee -a "$LOGS/profile_source.log"
      done
      ;;
    profile-e2e)
      step "profile e2e"
      python3 scripts/profile_e2e_step.py ${PROFILE_E2E_ARGS:-} 2>&1 \
        | tee "$LOGS/profile_e2e.log" | tail -n 120 || status=1
      ;;
    weights)
      step weights
      manifests=(~/xfer/*.manifest.json)
      [ -f "${manifests[0]}" ] || { echo "no manifests in ~/xfer"; exit 1; }
      cache=$(python3 -c "from dustin.fetch import cache_dir; print(cache_dir())")
      for manifest in "${manifests[@]}"; do
        python3 -m dustin fetch --quiet join "$manifest" --out-dir "$cache" || exit 1
      done
      ;;
    quality-*)
      ctx=${stage#quality-}
      step "quality $ctx"
      timeout "${QUALITY_TIMEOUT:-400}" python3 -m dustin eval --no-progress --contexts "$ctx" \
        --texts "${QUALITY_TEXTS:-prideprejudice,persuasion}" --steps "${QUALITY_STEPS:-24}" \
        --free-tokens "${QUALITY_FREE_TOKENS:-32}" \
        --pair-config "${QUALITY_PAIR_CONFIG:-bench/results/quality/qwen2.5-coder-0.5b_1.5b.calibrated.json}" \
        ${QUALITY_ARGS:-} --tag "cuda-$ctx${QUALITY_TAG:+-$QUALITY_TAG}" 2>&1 \
        | tee "$LOGS/quality_$ctx.log" | tail -n 60 || status=1
      ;;
    calibrate-*)
      ctx=${stage#calibrate-}
      step "calibrate $ctx"
      # Held-out from the quality texts above; the config lands in bench/results/quality/.
      # CALIBRATE_ARGS adds options, e.g. "--windows-per-text 4" for more calibration data.
      timeout "${CALIBRATE_TIMEOUT:-500}" python3 -m dustin calibrate --no-progress --context "$ctx" \
        --texts "${CALIBRATE_TEXTS:-emma,sensesensibility}" \
        --head-steps "${CALIBRATE_STEPS:-32}" --share-steps "${CALIBRATE_STEPS:-32}" ${CALIBRATE_ARGS:-} \
        --out "bench/results/quality/qwen2.5-coder-0.5b_1.5b.calibrated-$ctx.json" 2>&1 \
        | tee "$LOGS/calibrate_$ctx.log" | tail -n 40 || status=1
      ;;
    e2e-tp*)
      # The end-to-end benchmark with the target split over N GPUs (nvidia-h200-xN), rank 0
      # writing the results; BENCH_ARGS_e2e is passed on (default pairs: the 72B and 32B shapes).
      n=${stage#e2e-tp}
      step "bench e2e, tensor parallel over $n GPUs"
      NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node "$n" bench/bench_e2e.py --tp "$n" \
        ${BENCH_ARGS_e2e:---pairs qwen2.5-72b/0.5b qwen2.5-32b/0.5b} 2>&1 | tee "$LOGS/bench_e2e_tp$n.log" || status=1
      ;;
    base-bench-*)
      name=${stage#base-bench-}
      step "bench $name (baseline)"
      [ -d /tmp/base-site/dustin ] || { echo "no baseline build"; status=1; continue; }
      PYTHONPATH=/tmp/base-site:$PYTHONPATH DUSTIN_BENCH_TAG=base \
        DUSTIN_COMMIT="$(cat .base/.dustin-commit) (baseline build)" run_bench "$name" _base
      ;;
    bench-*)
      name=${stage#bench-}
      step "bench $name"
      run_bench "$name"
      ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
  # Ship what is done after every stage: a call cut off by its time limit still returns it.
  find bench/results -newer "$LOGS/.start" -type f -print0 | xargs -0 -r cp --parents -t "$LOGS"
  tar czf "$OUT/run.tgz" -C "$LOGS" .
done
echo "results: $(tar tzf "$OUT/run.tgz" | grep -c results/) files in run.tgz"
exit $status
