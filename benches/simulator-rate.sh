#!/usr/bin/env bash
# The simulator's raw orderquery rate under a load generator (wrk), on this machine.
#
#   benches/simulator-rate.sh [DURATION_SECONDS] [CONNECTIONS]
#
# Builds the release binary, starts `simulate` on a free loopback port, pays one order for each
# sign type, and lets wrk send correctly signed orderquery requests for it; a Lua check counts
# every reply that is not a signed SUCCESS, so the rate is of real answers, not of refusals.
# Prints one line per sign type: "simulator orderquery <sign type>: N req/s (non-success: M)".
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-10}"
connections="${2:-64}"

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
cargo build --release --quiet
bin=target/release/wxpay-reconciler

work=$(mktemp -d)
trap 'kill "$sim_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
RUST_LOG=warn "$bin" simulate --listen 127.0.0.1:0 >"$work/sim.out" &
sim_pid=$!
for _ in $(seq 1 100); do grep -q listening "$work/sim.out" 2>/dev/null && break; sleep 0.05; done
base=$(sed -n 's/^listening on //p' "$work/sim.out")

# sign FIELDS KEY TYPE: the v2 signature of "k=v&..." (already sorted, non-empty) + "&key=KEY".
sign() {
  if [ "$3" = MD5 ]; then
    printf '%s&key=%s' "$1" "$2" | md5sum | cut -d' ' -f1 | tr a-f A-F
  else
    printf '%s&key=%s' "$1" "$2" | openssl dgst -sha256 -hmac "$2" -r | cut -d' ' -f1 | tr a-f A-F
  fi
}

run() { # mch_id appid key sign_type
  local mch=$1 appid=$2 key=$3 st=$4 otn="bench${4//-/}$$"
  curl -fsS -X POST -H 'content-type: application/json' \
    -d '{"notify":"drop","total_fee":100}' "$base/_sim/orders/$mch/$otn/pay" >/dev/null
  local nonce=5K8264ILTKCH16CQ2502SI8ZNMTM67VS fields sign_type_field=""
  if [ "$st" = MD5 ]; then
    fields="appid=$appid&mch_id=$mch&nonce_str=$nonce&out_trade_no=$otn"
  else
    fields="appid=$appid&mch_id=$mch&nonce_str=$nonce&out_trade_no=$otn&sign_type=$st"
    sign_type_field="<sign_type>$st</sign_type>"
  fi
  local body="<xml><appid>$appid</appid><mch_id>$mch</mch_id><nonce_str>$nonce</nonce_str><out_trade_no>$otn</out_trade_no>$sign_type_field<sign>$(sign "$fields" "$key" "$st")</sign></xml>"
  cat >"$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = [[$body]]
wrk.headers["Content-Type"] = "text/xml"
local threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function(args) bad = 0 end
response = function(status, headers, body)
  if status ~= 200 or not body:find("<trade_state>SUCCESS</trade_state>", 1, true) then bad = bad + 1 end
end
done = function(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + t:get("bad") end
  io.write(string.format("RESULT %.0f %d %.2f\n", summary.requests / (summary.duration / 1e6), total, latency:percentile(99) / 1000))
end
LUA
  local out rate bad p99
  out=$(wrk -t2 -c"$connections" -d"${duration}s" -s "$work/post.lua" "$base/pay/orderquery")
  read -r rate bad p99 < <(sed -n 's/^RESULT //p' <<<"$out")
  echo "simulator orderquery $st: $rate req/s, p99 ${p99} ms (non-success replies: $bad; ${connections} connections, ${duration}s)"
}

run 10000100 wxd930ea5d5a258f4f 192006250b4c09247ec02edce69f6a2d MD5
run 1900000109 wx2421b1c4370ec43b 8934e7d15453e97507ef794cf7b0519d HMAC-SHA256
