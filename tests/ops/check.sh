#!/usr/bin/env bash
# Checks the operations kit with the real tools:
#   systemd/wxpay-reconciler.service  systemd-analyze verify + security (exposure <= 1.5)
#   systemd/config.example.toml       migrate + check-config (temp database and credential)
#   dashboards/alerts.yml             promtool check rules + promtool test rules
#   dashboards/wxpay-reconciler.json  JSON, schemaVersion, datasource variable, no fixed uid
# then runs the real daemon against the built-in simulator with a few orders (paid with a lost
# notification, a wrong amount, a notification, an expired one, an open one), scraped every
# second by a real Prometheus (Debian package `prometheus`) that loads alerts.yml, and evaluates
# every dashboard query, every variable query and every alert rule through its HTTP API, and
# checks that every metric they name is in the daemon's live /metrics. Daily bills are on: the
# bills job reconciles the simulator's (empty) past days at start, and no bill alert fires.
#
# Usage (from anywhere, after `cargo build`): bash tests/ops/check.sh [path/to/wxpay-reconciler]
# Needs: systemd (systemd-analyze), prometheus (promtool, prometheus), curl, python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=${1:-target/debug/wxpay-reconciler}
[[ -x $BIN ]] || { echo "FAIL: $BIN is not an executable (run cargo build first)"; exit 1; }
BIN=$(realpath "$BIN")

passed=0
failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }

TMP=$(mktemp -d)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
show_logs() {
  local f
  for f in "$@"; do echo "--- last lines of $(basename "$f")"; tail -n 30 "$f" 2>/dev/null || true; done
}

# --- tools ---------------------------------------------------------------------------------
need_apt=()
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || need_apt+=(prometheus)
command -v curl >/dev/null || need_apt+=(curl)
if ((${#need_apt[@]})); then
  echo "installing ${need_apt[*]} with apt-get"
  before=$(pgrep -x prometheus || true)
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The package may start its own server: stop the one it started (by pid), keep ours separate.
  for pid in $(pgrep -x prometheus || true); do
    grep -qx "$pid" <<<"$before" || kill -TERM "$pid" 2>/dev/null || true
  done
fi

# --- systemd unit --------------------------------------------------------------------------
UNIT=systemd/wxpay-reconciler.service
# `verify` checks that ExecStart's binary exists, which /usr/bin/wxpay-reconciler does not on a
# build host: verify a copy (same file name) whose paths point at the binary under test instead.
mkdir -p "$TMP/unit"
sed "s#/usr/bin/wxpay-reconciler#$BIN#g" "$UNIT" >"$TMP/unit/wxpay-reconciler.service"
if out=$(systemd-analyze verify "$TMP/unit/wxpay-reconciler.service" 2>&1); then
  pass "systemd-analyze verify $UNIT${out:+ (output: $out)}"
else
  fail "systemd-analyze verify $UNIT: $out"
fi

security=$(systemd-analyze security --offline=true --no-pager "$UNIT" 2>&1 || true)
exposure=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$security")
if [[ -n $exposure ]] && python3 -c "import sys; sys.exit(0 if float('$exposure') <= 1.5 else 1)"; then
  pass "systemd-analyze security: overall exposure $exposure <= 1.5"
else
  grep -E '✗|Overall' <<<"$security" || echo "$security"
  fail "systemd-analyze security: overall exposure '${exposure:-?}' is not <= 1.5"
fi
# The network the service needs must stay open: IPv4/IPv6 (WeChat, database, metrics) and unix
# sockets (a local database).
if grep -qE '^RestrictAddressFamilies=.*AF_INET( |$).*AF_INET6.*AF_UNIX' "$UNIT" \
  && ! grep -qE '^(PrivateNetwork=yes|IPAddressDeny=any)' "$UNIT"; then
  pass "unit keeps AF_INET, AF_INET6 and AF_UNIX and the host network"
else
  fail "unit must keep RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX and no PrivateNetwork/IPAddressDeny=any"
fi

# --- example config ------------------------------------------------------------------------
# The example reads the key from the systemd credential `api_key` and uses the packaged SQLite
# path: give it a credential directory and a temporary database.
mkdir -p "$TMP/creds" "$TMP/example"
printf '%s\n' 8934e7d15453e97507ef794cf7b0519d >"$TMP/creds/api_key"
if out=$(CREDENTIALS_DIRECTORY="$TMP/creds" \
  WXPAY_RECONCILER__DATABASE__URL="sqlite://$TMP/example/orders.db" \
  "$BIN" migrate --config systemd/config.example.toml 2>&1) \
  && out=$(CREDENTIALS_DIRECTORY="$TMP/creds" \
    WXPAY_RECONCILER__DATABASE__URL="sqlite://$TMP/example/orders.db" \
    "$BIN" check-config --config systemd/config.example.toml 2>&1); then
  pass "check-config systemd/config.example.toml"
else
  fail "check-config systemd/config.example.toml: $out"
fi

# --- alert rules ---------------------------------------------------------------------------
if out=$(promtool check rules dashboards/alerts.yml 2>&1); then
  pass "promtool check rules dashboards/alerts.yml ($(grep -o '[0-9]* rules found' <<<"$out"))"
else
  fail "promtool check rules: $out"
fi
if out=$(promtool test rules dashboards/alerts.test.yml 2>&1); then
  pass "promtool test rules dashboards/alerts.test.yml"
else
  fail "promtool test rules: $out"
fi

# --- runbook -------------------------------------------------------------------------------
# Every alert has a runbook_url whose anchor is a heading of docs/runbook.md (GitHub's anchor
# rule), under one base URL; the runbook's own #links resolve too.
if out=$(python3 - dashboards/alerts.yml docs/runbook.md <<'EOF' 2>&1
import re, sys
rules, book = open(sys.argv[1]).read(), open(sys.argv[2]).read()
def anchor(heading):
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
anchors = {anchor(h) for h in re.findall(r"^#+ (.*)$", book, re.M)}
alerts = re.findall(r"^\s*- alert: (\w+)", rules, re.M)
urls = re.findall(r"runbook_url: *\"?([^\s\"]+)", rules)
errors = []
if len(urls) != len(alerts):
    errors.append(f"{len(alerts)} alerts but {len(urls)} runbook_url annotations")
if len({u.split("#")[0] for u in urls}) > 1:
    errors.append("the runbook_url bases differ")
for u in urls:
    base, _, frag = u.partition("#")
    if not base.endswith("/docs/runbook.md") or frag not in anchors:
        errors.append(f"{u}: no such heading in docs/runbook.md")
for a in alerts:
    if a.lower() not in anchors:
        errors.append(f"alert {a} has no runbook section")
for link in re.findall(r"\]\(#([^)]+)\)", book):
    if link not in anchors:
        errors.append(f"runbook link #{link} goes nowhere")
if errors:
    print("; ".join(errors)); sys.exit(1)
print(f"{len(alerts)} alerts, each with a runbook section and a matching runbook_url")
EOF
); then
  pass "docs/runbook.md: $out"
else
  fail "docs/runbook.md: $out"
fi

# --- dashboard -----------------------------------------------------------------------------
if out=$(python3 - dashboards/wxpay-reconciler.json <<'EOF' 2>&1
import json, sys
d = json.load(open(sys.argv[1]))
errors = []
if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 39:
    errors.append(f"schemaVersion {d.get('schemaVersion')!r} is not 39 or later")
variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
ds = variables.get("datasource", {})
if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
    errors.append("no datasource variable (type datasource, query prometheus)")
for name in ("instance", "mch_id"):
    q = variables.get(name, {}).get("definition", "")
    if not q.startswith("label_values("):
        errors.append(f"variable {name} is not a label_values query")
def walk(node, where):
    if isinstance(node, dict):
        if "uid" in node and node.get("type") != "grafana" and node["uid"] != "${datasource}":
            errors.append(f"{where}: hard-coded datasource uid {node['uid']!r}")
        for k, v in node.items():
            walk(v, where)
    elif isinstance(node, list):
        for v in node:
            walk(v, where)
for v in variables.values():
    walk(v.get("datasource"), f"variable {v['name']}")
ids, n = set(), 0
for p in d.get("panels", []):
    if p["id"] in ids:
        errors.append(f"panel id {p['id']} repeated")
    ids.add(p["id"])
    if p.get("type") == "row":
        continue
    n += 1
    if p.get("datasource", {}).get("uid") != "${datasource}":
        errors.append(f"panel {p['title']!r} does not use the datasource variable")
    if not p.get("targets"):
        errors.append(f"panel {p['title']!r} has no query")
    for t in p.get("targets", []):
        if t.get("datasource", {}).get("uid", "${datasource}") != "${datasource}" or not t.get("expr"):
            errors.append(f"panel {p['title']!r} target {t.get('refId')}: no expr or a fixed datasource")
    walk(p, f"panel {p['title']!r}")
if errors:
    print("; ".join(errors)); sys.exit(1)
print(f"{n} panels, schemaVersion {d['schemaVersion']}")
EOF
); then
  pass "dashboards/wxpay-reconciler.json: $out"
else
  fail "dashboards/wxpay-reconciler.json: $out"
fi

# --- the real daemon, scraped by a real Prometheus -----------------------------------------
SIM_LOG=$TMP/simulate.log
"$BIN" simulate --listen 127.0.0.1:0 >"$SIM_LOG" 2>&1 &
PIDS+=($!)
SIM=
for _ in $(seq 1 100); do
  SIM=$(sed -n 's#^listening on http://##p' "$SIM_LOG")
  [[ -n $SIM ]] && break
  sleep 0.1
done
[[ -n $SIM ]] || { show_logs "$SIM_LOG"; fail "the simulator did not start"; echo "ops: $passed passed, $failed failed"; exit 1; }

MPORT=$(free_port)
NPORT=$(free_port)
PPORT=$(free_port)
export WXPAY_KEY_10000100=192006250b4c09247ec02edce69f6a2d
export WXPAY_KEY_1900000109=8934e7d15453e97507ef794cf7b0519d
export WXPAY_APIV3_KEY_1900000100=a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb
V3KEYS=$ROOT/tests/fixtures/wxpay-v3/keys
cat >"$TMP/config.toml" <<EOF
[database]
url = "sqlite://$TMP/orders.db"

[wechat]
base_url = "http://$SIM"
backup_base_url = "http://$SIM"
timeout_ms = 2000
connect_timeout_ms = 1000

[[merchants]]
mch_id = "10000100"
appid = "wxd930ea5d5a258f4f"
sign_type = "MD5"
api_key_env = "WXPAY_KEY_10000100"

[[merchants]]
mch_id = "1900000109"
appid = "wx2421b1c4370ec43b"
sign_type = "HMAC-SHA256"
api_key_env = "WXPAY_KEY_1900000109"

# The simulator's v3 test merchant (published test keys): public key and certificates both.
[[merchants]]
mch_id = "1900000100"
appid = "wxd678efh567hg6787"
api = "v3"
private_key_file = "$V3KEYS/java_sdk_merchant_private_key.pem"
cert_serial_no = "5F1C72E2A8931B72A2E13AF8DEE92471EB397115"
apiv3_key_env = "WXPAY_APIV3_KEY_1900000100"
wechatpay_public_key_file = "$V3KEYS/go_sdk_test_public_key.pem"
wechatpay_public_key_id = "PUB_KEY_ID_0000000000000024101100397200000006"
platform_certificates = "download"

[schedule]
scan_cron = "* * * * * *"
grace_seconds = 0
batch_size = 50
lease_seconds = 10
close_expired = true

[metrics]
listen = "127.0.0.1:$MPORT"
stuck_after_seconds = 1
refresh_seconds = 1

[notify]
listen = "127.0.0.1:$NPORT"

# The bill metrics exist only with bills on. The job runs at start: the simulator has no orders
# on past days, so each due day is an empty bill ("No Bill Exist"), reconciled at once.
[bills]
enabled = true

[log]
level = "info"
EOF

cat >"$TMP/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $ROOT/dashboards/alerts.yml
scrape_configs:
  - job_name: wxpay-reconciler
    static_configs:
      - targets: ["127.0.0.1:$MPORT"]
EOF
PROM=http://127.0.0.1:$PPORT
PROM_LOG=$TMP/prometheus.log
RUN_LOG=$TMP/run.log

sim_post() { curl -fsS -XPOST -H 'content-type: application/json' "http://$SIM/_sim/orders/$1" -d "$2" >/dev/null; }
db() { python3 -c 'import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=10); r = c.execute(sys.argv[2]).fetchall(); c.commit(); print("\n".join("|".join(map(str, x)) for x in r))' "$TMP/orders.db" "$1"; }
register() { # MCH_ID APPID OUT_TRADE_NO TOTAL_FEE [", MORE_COLUMNS" ", THEIR_SQL_VALUES"]
  db "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee${5:-}) VALUES ('$1', '$2', '$3', $4${6:-})" >/dev/null
}

started=false
if ! out=$("$BIN" migrate --config "$TMP/config.toml" 2>&1); then
  fail "migrate with the test config: $out"
else
  prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/prometheus" \
    --web.listen-address="127.0.0.1:$PPORT" --log.level=warn >"$PROM_LOG" 2>&1 &
  PIDS+=($!)
  RUN_STARTED=$(date +%s)
  "$BIN" run --config "$TMP/config.toml" >"$RUN_LOG" 2>&1 &
  RUN_PID=$!
  PIDS+=($RUN_PID)
  for _ in $(seq 1 150); do
    if curl -fsS "http://127.0.0.1:$MPORT/readyz" >/dev/null 2>&1 \
      && curl -fsS "$PROM/api/v1/query" --data-urlencode 'query=up{job="wxpay-reconciler"} == 1' 2>/dev/null | grep -q '"value"'; then
      started=true
      break
    fi
    kill -0 "$RUN_PID" 2>/dev/null || break
    sleep 0.2
  done
  if $started; then
    pass "daemon ready on 127.0.0.1:$MPORT (simulator $SIM) and scraped by Prometheus on 127.0.0.1:$PPORT"
  else
    show_logs "$RUN_LOG" "$PROM_LOG"
    fail "daemon not ready or not scraped within 30 s"
  fi
fi

if $started; then
  # Orders, registered at WeChat (the simulator) and in the shop's table, after Prometheus has
  # seen the counters at 0 so that increase() sees what happens next.
  notify_url="http://127.0.0.1:$NPORT/wxpay/v2/notify"
  for o in "10000100 ops-poll-1 100" "10000100 ops-mismatch-1 300" "1900000109 ops-notify-1 200" \
    "1900000109 ops-expired-1 400" "10000100 ops-open-1 500"; do
    read -r m n fee <<<"$o"
    sim_post "$m/$n" "{\"total_fee\":$fee,\"notify_url\":\"$notify_url\"}"
  done
  sim_post 10000100/ops-poll-1/pay '{"notify":"drop"}'
  sim_post 10000100/ops-mismatch-1/pay '{"notify":"drop","total_fee":301}'
  register 10000100 wxd930ea5d5a258f4f ops-poll-1 100
  register 10000100 wxd930ea5d5a258f4f ops-mismatch-1 300
  register 10000100 wxd930ea5d5a258f4f ops-open-1 500
  # Created 10 minutes ago (the daemon never closes an order younger than 5), expired 1 minute ago.
  register 1900000109 wx2421b1c4370ec43b ops-expired-1 400 ", created_at, expires_at" \
    ", datetime('now', '-10 minutes'), datetime('now', '-1 minutes')"
  register 1900000109 wx2421b1c4370ec43b ops-notify-1 200
  sim_post 1900000109/ops-notify-1/pay '{"notify":"deliver"}'
  for _ in $(seq 1 60); do
    settled=$(db "SELECT count(*) FROM wxpay_orders WHERE state NOT IN ('NOTPAY', 'USERPAYING')")
    [[ $settled -ge 4 ]] && break
    sleep 0.5
  done
  echo "orders: $(db "SELECT out_trade_no || '=' || state FROM wxpay_orders ORDER BY id" | tr '\n' ' ')"
  echo "events: $(db "SELECT out_trade_no || ':' || to_state || '/' || source FROM wxpay_order_events ORDER BY id" | tr '\n' ' ')"
  # The daemon under test did its job: the queries below must have something to show.
  expected_states="ops-poll-1=SUCCESS ops-mismatch-1=AMOUNT_MISMATCH ops-notify-1=SUCCESS ops-expired-1=CLOSED ops-open-1=NOTPAY"
  actual_states=$(db "SELECT out_trade_no || '=' || state FROM wxpay_orders ORDER BY id" | tr '\n' ' ')
  all_there=true
  for want in $expected_states; do
    grep -qw -- "$want" <<<"$actual_states" || all_there=false
  done
  if $all_there; then pass "orders settled, quarantined, closed and left open as expected"
  else fail "orders not as expected: want $expected_states, have $actual_states"; fi

  # The bills job ran at start and reconciled, for every merchant, the newest bill day due: the
  # Beijing day before yesterday before 10:00 Beijing, yesterday from 10:00 (either, when the
  # daemon started just before 10:00 and this runs after).
  newest_due_day() { # UNIX_TIME -> the start (00:00 Beijing = 16:00 UTC) of the newest due bill day
    python3 -c 'import sys; b = int(sys.argv[1]) + 28800; m = b - b % 86400 - 28800; print(m - 86400 * (1 if b % 86400 >= 36000 else 2))' "$1"
  }
  want_days="$(newest_due_day "$RUN_STARTED") $(newest_due_day "$(date +%s)")"
  bill_days_ok=false
  for _ in $(seq 1 60); do
    if curl -fsS "http://127.0.0.1:$MPORT/metrics" 2>/dev/null | python3 -c '
import re, sys
want = {int(x) for x in sys.argv[1].split()}
days = {}
for line in sys.stdin:
    m = re.match(r"wxpay_reconciler_last_reconciled_bill_day_timestamp_seconds\{[^}]*mch_id=\"(\w+)\"[^}]*\} (\S+)", line)
    if m:
        days[m.group(1)] = int(float(m.group(2)))
print(" ".join(f"{k}={v}" for k, v in sorted(days.items())) or "none")
sys.exit(0 if sorted(days) == ["10000100", "1900000100", "1900000109"] and set(days.values()) <= want else 1)
' "$want_days" >"$TMP/bill_days.txt"; then
      bill_days_ok=true
      break
    fi
    sleep 0.5
  done
  if $bill_days_ok; then pass "bills job: every merchant's newest due bill day reconciled ($(cat "$TMP/bill_days.txt"))"
  else fail "bills job: last reconciled bill days $(cat "$TMP/bill_days.txt" 2>/dev/null), want one of $want_days for each merchant"; fi
  sleep 4 # a few more scrapes and rule evaluations

  curl -fsS "http://127.0.0.1:$MPORT/metrics" >"$TMP/metrics.txt"
  if out=$(python3 - "$PROM" "127.0.0.1:$MPORT" dashboards/wxpay-reconciler.json dashboards/alerts.yml "$TMP/metrics.txt" <<'EOF' 2>&1
import json, re, sys, time, urllib.parse, urllib.request
prom, instance, dash_path, rules_path, metrics_path = sys.argv[1:6]
failures = 0
def out(kind, msg):
    global failures
    failures += kind == "FAIL"
    print(f"{kind}: {msg}")
def api(path, **params):
    url = f"{prom}{path}?{urllib.parse.urlencode(params, doseq=True)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.load(e)

# Grafana's variables, as Grafana would expand them for this one daemon and both merchants.
subst = {"$__rate_interval": "15s", "$__interval": "5s", "$__range": "5m", "$instance": instance,
         "$mch_id": "10000100|1900000109|1900000100", "${datasource}": "prometheus", "$datasource": "prometheus"}
def expand(expr):
    for k in sorted(subst, key=len, reverse=True):
        expr = expr.replace(k, subst[k])
    return expr

dash = json.load(open(dash_path))
exprs = []  # (where, expr)
for p in dash["panels"]:
    for t in p.get("targets", []):
        exprs.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
empty = []
for where, expr in exprs:
    r = api("/api/v1/query", query=expand(expr))
    if r.get("status") != "success":
        out("FAIL", f"{where}: {r.get('errorType')}: {r.get('error')}\n      {expand(expr)}")
    elif not r["data"]["result"]:
        empty.append(where)
for v in dash["templating"]["list"]:
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v.get("definition", ""))
    if v.get("type") != "query":
        continue
    if not m:
        out("FAIL", f"variable {v['name']}: cannot read {v.get('definition')!r}")
        continue
    r = api("/api/v1/series", **{"match[]": expand(m.group(1))})
    values = sorted({s.get(m.group(2)) for s in r.get("data", []) if s.get(m.group(2))})
    if r.get("status") != "success" or not values:
        out("FAIL", f"variable {v['name']}: {r.get('error') or 'no values'}")
    else:
        print(f"variable {v['name']}: {', '.join(values)}")
if failures == 0:
    out("PASS", f"{len(exprs)} dashboard queries evaluated without error")
if empty:
    print(f"WARN: {len(empty)} dashboard queries returned no series: {'; '.join(empty)}")

# The rules as Prometheus loaded them from alerts.yml: all loaded, evaluated, healthy.
expected = len(re.findall(r"^\s*- alert:", open(rules_path).read(), re.M))
before = failures
for _ in range(30):
    groups = api("/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    if rules and all(r.get("lastEvaluation", "0001").startswith("20") for r in rules):
        break
    time.sleep(1)
if len(rules) != expected:
    out("FAIL", f"Prometheus loaded {len(rules)} rules, alerts.yml has {expected}")
for r in rules:
    if r.get("health") != "ok":
        out("FAIL", f"rule {r['name']}: health {r.get('health')} {r.get('lastError', '')}")
    q = api("/api/v1/query", query=r["query"])
    if q.get("status") != "success":
        out("FAIL", f"rule {r['name']}: {q.get('error')}")
if failures == before:
    out("PASS", f"{len(rules)} alert rules loaded by Prometheus, evaluated healthy, expressions evaluate")
states = {r["name"]: r.get("state", "?") for r in rules}
print("alert states: " + ", ".join(f"{k}={v}" for k, v in sorted(states.items())))

# Every wxpay_reconciler_* metric named by the dashboard and the rules is exported.
live = set()
for line in open(metrics_path):
    m = re.match(r"(?:# TYPE )?(wxpay_reconciler_\w+)", line)
    if m:
        live.add(re.sub(r"_(bucket|sum|count)$", "", m.group(1)))
named = set()
for text in [e for _, e in exprs] + [r["query"] for r in rules] + [v.get("definition", "") for v in dash["templating"]["list"]]:
    named |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"wxpay_reconciler_\w+", text)}
missing = sorted(named - live)
if missing:
    out("FAIL", f"{len(missing)} metrics named by the dashboard or the rules are not in the daemon's /metrics: {', '.join(missing)}")
else:
    out("PASS", f"all {len(named)} metrics named by the dashboard and the rules are in the daemon's /metrics")

# The merchant variable filters every dashboard query on a metric that has an mch_id label.
with_mch = set()
for line in open(metrics_path):
    m = re.match(r"(wxpay_reconciler_\w+)\{[^}]*\bmch_id=", line)
    if m:
        with_mch.add(re.sub(r"_(bucket|sum|count)$", "", m.group(1)))
unfiltered = []
for where, expr in exprs:
    for name, sel in re.findall(r"(wxpay_reconciler_\w+)(\{[^}]*\})?", expr):
        if re.sub(r"_(bucket|sum|count)$", "", name) in with_mch and 'mch_id=~"$mch_id"' not in sel:
            unfiltered.append(f"{where} ({name})")
if unfiltered:
    out("FAIL", f"{len(unfiltered)} dashboard queries ignore the $mch_id variable: {'; '.join(unfiltered)}")
else:
    out("PASS", f"every dashboard query on a metric with an mch_id label uses $mch_id ({len(with_mch)} such metrics)")
sys.exit(1 if failures else 0)
EOF
  ); then
    eval_status=0
  else
    eval_status=$?
  fi
  echo "$out"
  # Count the PASS/FAIL lines the evaluator printed (a crash without them is a failure too).
  passed=$((passed + $(grep -c '^PASS:' <<<"$out" || true)))
  failed=$((failed + $(grep -c '^FAIL:' <<<"$out" || true)))
  if ((eval_status != 0)) && ! grep -q '^FAIL:' <<<"$out"; then fail "the Prometheus evaluation exited with status $eval_status"; fi

  # A real amount mismatch fires its alert end to end.
  if [[ $(db "SELECT state FROM wxpay_orders WHERE out_trade_no = 'ops-mismatch-1'") == AMOUNT_MISMATCH ]]; then
    firing=false
    for _ in $(seq 1 20); do
      if curl -fsS "$PROM/api/v1/alerts" | python3 -c 'import json, sys; a = json.load(sys.stdin)["data"]["alerts"]; sys.exit(0 if any(x["labels"]["alertname"] == "WxpayReconcilerAmountMismatch" and x["labels"].get("mch_id") == "10000100" and x["state"] == "firing" for x in a) else 1)'; then
        firing=true
        break
      fi
      sleep 0.5
    done
    if $firing; then pass "WxpayReconcilerAmountMismatch fires for a real mismatch (mch_id 10000100)"
    else fail "WxpayReconcilerAmountMismatch did not fire for a real mismatch"; fi
  else
    fail "order ops-mismatch-1 was not quarantined as AMOUNT_MISMATCH"
  fi

  # Every due day reconciled, without findings or errors: no daily-bill alert fires.
  bill_alerts=$(curl -fsS "$PROM/api/v1/alerts" | python3 -c 'import json, sys; print(" ".join(sorted({a["labels"]["alertname"] + "/" + a["labels"].get("mch_id", "") for a in json.load(sys.stdin)["data"]["alerts"] if a["labels"]["alertname"].startswith("WxpayReconcilerBill") and a["state"] == "firing"})))' || echo "(no answer from Prometheus)")
  if [[ -z $bill_alerts ]]; then pass "no daily-bill alert fires"
  else fail "daily-bill alerts fire: $bill_alerts"; fi

  # SIGHUP (ExecReload=) applies a valid change and refuses an invalid file, still running.
  reloads() {
    curl -fsS "http://127.0.0.1:$MPORT/metrics" 2>/dev/null \
      | awk -v o="outcome=\"$1\"" '$1 ~ /^wxpay_reconciler_config_reloads_total\{/ && index($1, o) { print $2 }'
  }
  wait_reloads() { # OUTCOME ABOVE
    local n
    for _ in $(seq 1 50); do
      n=$(reloads "$1")
      [[ -n $n ]] && python3 -c "import sys; sys.exit(0 if float('$n') > float('$2') else 1)" && return 0
      sleep 0.2
    done
    return 1
  }
  ok0=$(reloads ok || true)
  err0=$(reloads error || true)
  sed -i 's/^batch_size = 50$/batch_size = 40/' "$TMP/config.toml"
  kill -HUP "$RUN_PID" 2>/dev/null || true
  if [[ -n $ok0 ]] && wait_reloads ok "$ok0"; then pass "SIGHUP reloads a changed [schedule] (config_reloads_total{outcome=\"ok\"})"
  else fail "SIGHUP did not count a successful reload"; fi
  sed -i 's/^batch_size = 40$/batch_size = 0/' "$TMP/config.toml"
  kill -HUP "$RUN_PID" 2>/dev/null || true
  if [[ -n $err0 ]] && wait_reloads error "$err0" && curl -fsS "http://127.0.0.1:$MPORT/healthz" >/dev/null; then
    pass "SIGHUP refuses an invalid file and keeps running (config_reloads_total{outcome=\"error\"})"
  else
    fail "SIGHUP with an invalid file: no error counted or the daemon stopped"
  fi

  # SIGTERM drains and exits 0, as systemd's stop expects.
  kill -TERM "$RUN_PID" 2>/dev/null || true
  if wait "$RUN_PID"; then pass "daemon exits 0 on SIGTERM"; else fail "daemon exit status $? on SIGTERM"; fi
  ((failed == 0)) || show_logs "$RUN_LOG" "$PROM_LOG"
fi

echo "ops: $passed passed, $failed failed"
((failed == 0))
