#!/usr/bin/env bash
# Load-test `ponder serve` with guidellm (0.8.x) at a fixed concurrency and save its JSON report.
#
#   benchmarks/guidellm_serve.sh [OUTPUT_JSON] [PORT]
#
#   OUTPUT_JSON  guidellm's JSON report (default: benchmarks/results/guidellm-c16.json)
#   PORT         port for the server (default: 8011)
#
# Starts `ponder serve` on 127.0.0.1:PORT in the background (log in /tmp), waits for /health,
# runs guidellm's concurrent profile on synthetic text for a bounded number of requests, stops
# the server (SIGTERM, then waits), and prints a short summary read from the JSON report.
# Exits non-zero if the server did not come up, guidellm failed, or any request errored.
#
# Knobs (environment): CONCURRENCY=16 REQUESTS=48 PROMPT_TOKENS=128 OUTPUT_TOKENS=64
#   MAX_NUM_SEQS=16 MODEL= (ponder's default model) EXTRA_SERVE_ARGS= SERVER_LOG=/tmp/...
#   TOKENIZER= (a local folder with tokenizer.json; default: the one ponder exports for MODEL)
#   GUIDELLM=<repo>/.venv-guidellm/bin/guidellm (make guidellm) PONDER=<repo>/.venv/bin/ponder
#   REQUEST_FORMAT=/v1/chat/completions (or /v1/completions) HEALTH_TIMEOUT=300
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

OUT="$(abspath "${1:-$REPO/benchmarks/results/guidellm-c16.json}")"
PORT="${2:-8011}"
CONCURRENCY="${CONCURRENCY:-16}"
REQUESTS="${REQUESTS:-48}"
PROMPT_TOKENS="${PROMPT_TOKENS:-128}"
OUTPUT_TOKENS="${OUTPUT_TOKENS:-64}"
MAX_NUM_SEQS="${MAX_NUM_SEQS:-$(( CONCURRENCY > 16 ? CONCURRENCY : 16 ))}"
MODEL="${MODEL:-}"
REQUEST_FORMAT="${REQUEST_FORMAT:-/v1/chat/completions}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-300}"
GUIDELLM="${GUIDELLM:-$REPO/.venv-guidellm/bin/guidellm}"      # `make guidellm` creates it
GUIDELLM_PY="$(dirname "$GUIDELLM")/python"
PONDER="${PONDER:-$REPO/.venv/bin/ponder}"
PONDER_PY="$(dirname "$PONDER")/python"
SERVER_LOG="${SERVER_LOG:-/tmp/ponder-guidellm-$PORT.log}"
GUIDELLM_LOG="${GUIDELLM_LOG:-/tmp/guidellm-c$CONCURRENCY-$PORT.log}"
BASE="http://127.0.0.1:$PORT"

# Nothing may be fetched from the Hugging Face hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

for exe in "$GUIDELLM" "$PONDER"; do
    [[ -x "$exe" ]] || { echo "error: $exe not found or not executable" >&2; exit 2; }
done
if curl -fsS -o /dev/null --max-time 2 "$BASE/health" 2>/dev/null; then
    echo "error: something already answers on $BASE; pick another port" >&2; exit 2
fi

# The tokenizer guidellm uses to size synthetic prompts: the folder ponder exports from the GGUF.
if [[ -z "${TOKENIZER:-}" ]]; then
    TOKENIZER="$(cd "$REPO" && PONDER_MODEL="$MODEL" "$PONDER_PY" - <<'EOF'
import os
from ponder.config import EngineConfig
from ponder.model.loader import _cached, resolve_model_path
cache = EngineConfig().cache_dir
path = resolve_model_path(os.environ["PONDER_MODEL"] or None, cache)
if os.path.isdir(path):          # a Hugging Face folder carries its own tokenizer
    print(path)
else:
    from ponder.model.gguf import export_tokenizer
    print(_cached(path, "tokenizer", cache, lambda out: export_tokenizer(path, out)))
EOF
)"
fi
[[ -f "$TOKENIZER/tokenizer.json" ]] || { echo "error: no tokenizer.json in '$TOKENIZER'" >&2; exit 2; }

SERVER_PID=""
stop_server() {
    [[ -n "$SERVER_PID" ]] || return 0
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "server $SERVER_PID ignored SIGTERM for 30 s; killing it" >&2
            kill -KILL "$SERVER_PID" 2>/dev/null || true
        fi
    fi
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

serve_args=(serve --host 127.0.0.1 --port "$PORT" --max-num-seqs "$MAX_NUM_SEQS" --access-log)
[[ -n "$MODEL" ]] && serve_args+=(--model "$MODEL")
# shellcheck disable=SC2206
[[ -n "${EXTRA_SERVE_ARGS:-}" ]] && serve_args+=($EXTRA_SERVE_ARGS)
echo "starting: $PONDER ${serve_args[*]}  (log: $SERVER_LOG)"
(cd "$REPO" && exec "$PONDER" "${serve_args[@]}") >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!

deadline=$(( SECONDS + HEALTH_TIMEOUT ))
until curl -fsS -o /dev/null --max-time 2 "$BASE/health" 2>/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "error: the server exited before it was healthy; its log ($SERVER_LOG):" >&2
        tail -n 30 "$SERVER_LOG" >&2; exit 3
    fi
    if (( SECONDS >= deadline )); then
        echo "error: $BASE/health not OK after ${HEALTH_TIMEOUT}s; see $SERVER_LOG" >&2; exit 3
    fi
    sleep 1
done
SERVED_MODEL="$(curl -fsS --max-time 5 "$BASE/v1/models" | "$GUIDELLM_PY" -c \
    'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"
echo "server healthy (pid $SERVER_PID, model $SERVED_MODEL); tokenizer: $TOKENIZER"

mkdir -p "$(dirname "$OUT")"
rm -f "$OUT"
gl_args=(run
    --backend "kind=openai_http,target=$BASE,model=$SERVED_MODEL,request_format=$REQUEST_FORMAT"
    --profile "kind=concurrent,streams=$CONCURRENCY"
    --constraint "kind=max_requests,count=$REQUESTS"
    --data "kind=synthetic_text,prompt_tokens=$PROMPT_TOKENS,output_tokens=$OUTPUT_TOKENS"
    --tokenizer "kind=huggingface_auto,model=$TOKENIZER"
    --output "kind=json,path=$OUT"
    --disable-console-interactive)
echo "running: $GUIDELLM ${gl_args[*]}  (log: $GUIDELLM_LOG)"
set +e
(cd /tmp && "$GUIDELLM" "${gl_args[@]}") 2>&1 | tee "$GUIDELLM_LOG"
gl_rc=${PIPESTATUS[0]}
set -e

# guidellm records neither the body nor the server's answer of a failed request, and ponder does
# not log 4xx bodies: if any request errored, replay one request of the same shape while the
# server is still up and keep its answer (status and body) in $PROBE_LOG.
PROBE_LOG="${SERVER_LOG%.log}-probe.txt"
rm -f "$PROBE_LOG"
if [[ -s "$OUT" ]]; then
    "$GUIDELLM_PY" - "$OUT" "$BASE" "$REQUEST_FORMAT" "$SERVED_MODEL" "$PROMPT_TOKENS" "$OUTPUT_TOKENS" \
        "$PROBE_LOG" <<'EOF' || true
import json, sys, urllib.error, urllib.request
out, base, fmt, model, prompt_tokens, output_tokens, probe_log = sys.argv[1:]
report = json.load(open(out))
if not any(b["metrics"]["request_totals"].get("errored") for b in report.get("benchmarks", [])):
    sys.exit(0)
text = " ".join(["word"] * int(prompt_tokens))
# The body guidellm 0.8 sends (backends/openai/request_handlers.py), None fields dropped.
body = {"model": model, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
if fmt == "/v1/completions":
    body.update(max_tokens=int(output_tokens), ignore_eos=True, prompt=text)
else:
    body.update(max_completion_tokens=int(output_tokens), ignore_eos=True,
                messages=[{"role": "user", "content": [{"type": "text", "text": text}]}])
req = urllib.request.Request(base + fmt, json.dumps(body).encode(), {"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=120) as r:
        status, answer = r.status, r.read(2000).decode(errors="replace")
except urllib.error.HTTPError as e:
    status, answer = e.code, e.read().decode(errors="replace")
except Exception as e:  # noqa: BLE001
    status, answer = None, repr(e)
short = text[:40] + "..."
shown = dict(body, **({"prompt": short} if "prompt" in body else
                      {"messages": [{"role": "user", "content": [{"type": "text", "text": short}]}]}))
with open(probe_log, "w") as f:
    f.write(f"POST {base}{fmt}\nbody: {json.dumps(shown)}\nstatus: {status}\nanswer: {answer[:2000]}\n")
EOF
fi

stop_server
echo "server stopped; its log: $SERVER_LOG"

if [[ $gl_rc -ne 0 || ! -s "$OUT" ]]; then
    echo "error: guidellm exited with $gl_rc and/or wrote no report at $OUT (log: $GUIDELLM_LOG)" >&2
    exit 4
fi

"$GUIDELLM_PY" - "$OUT" "$SERVER_LOG" "$PROBE_LOG" <<'EOF'
import json, os, sys

path, server_log, probe_log = sys.argv[1:4]
report = json.load(open(path))
benchmarks = report.get("benchmarks") or []
if not benchmarks:
    sys.exit(f"error: no benchmarks in {path}")

def metric(metrics, name, field="successful"):
    """A metric's distribution for successful requests (guidellm's StatusDistributionSummary)."""
    m = metrics.get(name)
    return (m or {}).get(field) or {}

def p50(dist):
    pct = dist.get("percentiles") or {}
    v = pct.get("p50", dist.get("median"))
    return float("nan") if v is None else v

errored_total = 0
for b in benchmarks:
    m = b["metrics"]
    totals = m["request_totals"]
    ok, err, inc = totals.get("successful", 0), totals.get("errored", 0), totals.get("incomplete", 0)
    errored_total += err + inc
    strategy = b.get("config", {}).get("strategy", {})
    streams = strategy.get("streams", "?")
    out_tps = metric(m, "output_tokens_per_second", "successful").get("mean", float("nan"))
    ttft = p50(metric(m, "time_to_first_token_ms"))
    itl = p50(metric(m, "inter_token_latency_ms"))
    tpot = p50(metric(m, "time_per_output_token_ms"))
    lat = p50(metric(m, "request_latency"))
    dur = b.get("duration", float("nan"))
    print(f"guidellm summary ({path}), concurrency {streams}:")
    print(f"  requests: {ok} completed, {err} errored, {inc} incomplete  (duration {dur:.1f} s)")
    print(f"  output tokens/s (mean): {out_tps:.1f}")
    print(f"  TTFT p50: {ttft:.1f} ms   ITL p50: {itl:.2f} ms   TPOT p50: {tpot:.2f} ms   "
          f"request latency p50: {lat:.2f} s")
    if err:
        reqs = (b.get("requests") or {}).get("errored") or []
        msgs = sorted({(r.get("info") or {}).get("error") or r.get("error") or "?" for r in reqs})
        for msg in msgs[:5]:
            print(f"  error: {str(msg)[:300]}")
        print(f"  (see the server log: {server_log})")
if errored_total and os.path.exists(probe_log):
    print(f"replayed one request of the same shape ({probe_log}):")
    for line in open(probe_log):
        print("  " + line.rstrip()[:600])
sys.exit(1 if errored_total else 0)
EOF
