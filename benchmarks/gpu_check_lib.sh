# The stage runner of benchmarks/gpu_check.sh, sourced by it (and by tests/test_gpu_check.py).
# Reads OUT, SUMMARY, BUDGET, STARTED, DRY and WORK; see gpu_check.sh.

remaining() { echo $(( BUDGET - ($(date +%s) - STARTED) )); }
note() { printf '%-20s %s\n' "$1" "$2" | tee -a "$SUMMARY"; }
skip() { note "$1" "SKIP: $2"; }

# junit_counts XML: "P passed, F failed, S skipped" from a pytest junit XML, if there is one.
junit_counts() {
    [ -s "$1" ] || return 0
    python3 - "$1" <<'PY'
import sys
import xml.etree.ElementTree as tree

suites = tree.parse(sys.argv[1]).getroot()
suites = [suites] if suites.tag == "testsuite" else list(suites)
total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors",
                                                                     "skipped")}
failed = total["failures"] + total["errors"]
passed = total["tests"] - failed - total["skipped"]
print(f"{passed} passed, {failed} failed, {total['skipped']} skipped")
PY
}

# stage NAME MAX_SECONDS COMMAND...: runs COMMAND (output in $OUT/NAME.log; a pytest command gets
# --junitxml=$OUT/NAME.xml) with the smaller of MAX_SECONDS and what is left of the budget;
# records PASS / FAIL / TIMEOUT with its time and counts.
stage() {
    local name=$1 limit=$2
    shift 2
    local left command=("$@")
    left=$(remaining)
    if [ "$DRY" = 1 ]; then
        note "$name" "SKIP: dry run (would run at most ${limit} s: ${command[*]:0:6} ...)"
        return 0
    fi
    if (( left < 20 )); then
        note "$name" "SKIP: out of time (${left} s of the ${BUDGET} s budget left)"
        return 1
    fi
    (( limit > left )) && limit=$left
    local part
    for part in "${command[@]}"; do
        [ "$part" = pytest ] && command+=("--junitxml=$OUT/$name.xml") && break
    done
    echo "--- $name (at most ${limit} s) ---"
    local begin rc took counts
    begin=$(date +%s)
    timeout --signal=INT --kill-after=15 "$limit" "${command[@]}" > "$OUT/$name.log" 2>&1
    rc=$?
    took=$(( $(date +%s) - begin ))
    counts=$(junit_counts "$OUT/$name.xml")
    if (( rc == 0 )); then
        note "$name" "PASS in ${took} s ${counts}"
    elif (( rc == 124 || rc == 137 )); then
        note "$name" "TIMEOUT after ${took} s ${counts}"
    else
        note "$name" "FAIL (rc $rc) in ${took} s ${counts}"
    fi
    return $rc
}

# cuda_home: the toolkit folder of the nvcc on PATH (the one nvcc itself reports as TOP, so a
# wrapper script outside the toolkit resolves too), else $CUDA_HOME, else /usr/local/cuda.
cuda_home() {
    local top
    if command -v nvcc > /dev/null; then
        top=$(cd "$WORK" && : > probe.cu && nvcc --dryrun -c probe.cu 2>&1 |
            sed -n 's/^#\$ TOP=//p' | head -1)
        if [ -n "$top" ] && [ -f "$top/include/cuda_runtime.h" ]; then
            (cd "$top" && pwd)
            return
        fi
    fi
    echo "${CUDA_HOME:-/usr/local/cuda}"
}

