#!/usr/bin/env python3
"""Interop check: the third-party Python SDK `wechatpayv3` against `wxpay-reconciler simulate` (API v3).

Proves that an unmodified wechatpayv3 client (see requirements.txt for the pinned version),
with its own request signing and its own answer verification, can query and close orders of
the simulator's v3 test merchant (1900000100) in both of WeChat's key modes (the "WeChat Pay
public key" and downloaded platform certificates), that it refuses answers the simulator
deliberately mis-signs, that its callback helper verifies and decrypts the payment
notifications the simulator delivers, and that its `trade_bill` (verified) and `download_bill`
(signed request, unsigned answer) get a gzip bill whose SHA-1 is the answer's `hash_value`.

    python3 -m venv .venv-interop
    .venv-interop/bin/pip install -r tests/interop/requirements.txt
    wxpay-reconciler simulate --listen 127.0.0.1:18080 &
    .venv-interop/bin/python tests/interop/wechatpayv3_interop.py --base-url http://127.0.0.1:18080/

Prints one line per check and finally `N passed, N failed`; exits 0 only when nothing failed.
Uses only the standard library and wechatpayv3.

The base URL: wechatpayv3 2.0.x hardcodes https://api.mch.weixin.qq.com as the instance
attribute `Core._gate_way`, set in `Core.__init__`; this script overwrites that attribute on
the client's core (a monkeypatch of the SDK's base URL, nothing else). In certificate mode
the SDK downloads the certificates inside its constructor, before the URL can be changed, so
the constructor's `Core._init_certificates` is suspended for the construction and called on
the client once its URL points at the simulator: the same code path, one step later.
"""

import argparse
import gzip
import hashlib
import json
import os
import secrets
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from wechatpayv3 import WeChatPay, WeChatPayType
from wechatpayv3.core import Core

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS = os.path.join(HERE, "..", "fixtures", "wxpay-v3", "keys")

# The simulator's v3 test merchant (published test keys of the upstream SDKs, not secrets).
MCHID = "1900000100"
APPID = "wxd678efh567hg6787"
MERCHANT_SERIAL = "5F1C72E2A8931B72A2E13AF8DEE92471EB397115"
APIV3_KEY = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb"
PUBLIC_KEY_ID = "PUB_KEY_ID_0000000000000024101100397200000006"
CERT_F576 = "F5765756002FDD77"
CERT_D7CE = "D7CE59D1F522D701"
SECRETS = [APIV3_KEY]


def read_key(name):
    with open(os.path.join(KEYS, name), encoding="utf-8") as f:
        return f.read()


def redact(text):
    text = str(text)
    for s in SECRETS:
        text = text.replace(s, "<redacted>")
    return text


class CheckFailed(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def new_out_trade_no():
    return "py3" + secrets.token_hex(13)  # 29 chars, WeChat allows up to 32


class Runner:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, fn):
        try:
            fn()
        except Exception as e:  # any failure, the SDK's included, is this check's failure
            self.failed += 1
            print("FAIL %s: %s: %s" % (name, type(e).__name__, redact(e)))
        else:
            self.passed += 1
            print("ok   %s" % name)


class Simulator:
    """The simulator's control API (plain JSON over urllib)."""

    def __init__(self, base_url):
        self.base = base_url.rstrip("/")

    def call(self, method, path, body=None):
        data = json.dumps(body if body is not None else {}).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def create(self, out_trade_no, fee, notify_url=None):
        body = {"total_fee": fee}
        if notify_url:
            body["notify_url"] = notify_url
        status, b = self.call("POST", "/_sim/orders/%s/%s" % (MCHID, out_trade_no), body)
        expect(status == 201, "create: %s %s" % (status, b))

    def pay(self, out_trade_no, notify="drop", **extra):
        body = dict(extra, notify=notify)
        status, b = self.call("POST", "/_sim/orders/%s/%s/pay" % (MCHID, out_trade_no), body)
        expect(status == 200, "pay: %s %s" % (status, b))
        return b

    def keys(self, **setup):
        status, b = self.call("PUT", "/_sim/v3/%s/keys" % MCHID, setup)
        expect(status == 200, "keys: %s %s" % (status, b))
        return b

    def faults(self, **faults):
        status, b = self.call("PUT", "/_sim/faults", faults)
        expect(status == 200, "faults: %s %s" % (status, b))


def client(base_url, mode):
    """A wechatpayv3 client of the test merchant at the simulator: mode "public_key" or
    "certificates"."""
    kwargs = dict(
        wechatpay_type=WeChatPayType.NATIVE,
        mchid=MCHID,
        private_key=read_key("java_sdk_merchant_private_key.pem"),
        cert_serial_no=MERCHANT_SERIAL,
        appid=APPID,
        apiv3_key=APIV3_KEY,
        timeout=(5, 10),
    )
    if mode == "public_key":
        kwargs.update(public_key=read_key("go_sdk_test_public_key.pem"),
                      public_key_id=PUBLIC_KEY_ID)
        wxpay = WeChatPay(**kwargs)
        wxpay._core._gate_way = base_url.rstrip("/")
        return wxpay
    # Certificate mode: the constructor would download from the real host; see the docstring.
    init = Core._init_certificates
    Core._init_certificates = lambda self: None
    try:
        wxpay = WeChatPay(**kwargs)
    finally:
        Core._init_certificates = init
    wxpay._core._gate_way = base_url.rstrip("/")
    wxpay._core._init_certificates()
    return wxpay


class Receiver:
    """A notify_url on a free port: records each POST, answers 500 to the first `fail_first`
    then 204."""

    def __init__(self, fail_first=0):
        self.got = []
        self.fail_first = fail_first
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer.lock:
                    outer.got.append((self.path, self.headers, body))
                    failing = len(outer.got) <= outer.fail_first
                self.send_response(500 if failing else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = "http://127.0.0.1:%d/wxpay/v3/notify" % self.server.server_address[1]

    def wait_for(self, n, seconds=10):
        deadline = time.time() + seconds
        while time.time() < deadline:
            with self.lock:
                if len(self.got) >= n:
                    return list(self.got)
            time.sleep(0.02)
        raise CheckFailed("expected %d notifications, got %d" % (n, len(self.got)))

    def close(self):
        self.server.shutdown()


def expect_ok(status, body, code=200):
    expect(status == code, "HTTP %s: %s" % (status, body))


def run(r, base_url):
    sim = Simulator(base_url)
    sim.keys(mode="both", certificates=[CERT_F576], sign_with=CERT_F576)
    sim.faults(endpoint="all")
    pk = client(base_url, "public_key")
    state = {}

    def certificate_mode_downloads():
        c = client(base_url, "certificates")
        serials = sorted("%X" % cert.serial_number for cert in c._core._certificates)
        expect(serials == [CERT_F576], "downloaded certificates %s" % serials)
        state["cert"] = c

    r.check("certificate mode: the SDK downloads, decrypts and keeps the platform certificate",
            certificate_mode_downloads)

    def query_notpay(c, label):
        def check():
            n = new_out_trade_no()
            sim.create(n, 1234)
            status, text = c.query(out_trade_no=n)  # the SDK verifies a 2xx answer or raises
            expect_ok(status, text)
            t = json.loads(text)
            expect(t["trade_state"] == "NOTPAY" and t["out_trade_no"] == n and t["mchid"] == MCHID,
                   "%s: %s" % (label, t))
            expect(t["amount"] == {"payer_currency": "CNY", "total": 1234}, "amount %s" % t)
            expect("transaction_id" not in t and "success_time" not in t, "NOTPAY fields %s" % t)
        return check

    r.check("public key mode: query a NOTPAY order, answer verified by the SDK",
            query_notpay(pk, "public key"))

    def query_paid(c):
        n = new_out_trade_no()
        sim.create(n, 88)
        paid = sim.pay(n, paid_at="2024-08-05T17:33:41+08:00")
        status, text = c.query(out_trade_no=n)
        expect_ok(status, text)
        t = json.loads(text)
        expect(t["trade_state"] == "SUCCESS", "trade_state %s" % t)
        expect(t["transaction_id"] == paid["transaction_id"], "transaction_id %s" % t)
        expect(t["amount"]["total"] == 88 and t["amount"]["currency"] == "CNY", "amount %s" % t)
        expect(t["success_time"] == "2024-08-05T17:33:41+08:00", "success_time %s" % t)

    r.check("public key mode: query a paid order", lambda: query_paid(pk))
    r.check("certificate mode: query a paid order",
            lambda: query_paid(state["cert"]) if "cert" in state else expect(False, "no client"))

    def query_unknown():
        status, text = pk.query(out_trade_no=new_out_trade_no())
        expect(status == 404, "HTTP %s" % status)
        expect(json.loads(text)["code"] == "ORDER_NOT_EXIST", text)

    r.check("query of an unknown order: 404 ORDER_NOT_EXIST", query_unknown)

    def close(c):
        def check():
            n = new_out_trade_no()
            sim.create(n, 5)
            status, text = c.close(out_trade_no=n)  # a 204 is verified too (empty body)
            expect(status == 204, "close: HTTP %s %r" % (status, text))
            status, text = c.query(out_trade_no=n)
            expect_ok(status, text)
            expect(json.loads(text)["trade_state"] == "CLOSED", text)
            status, _ = c.close(out_trade_no=n)
            expect(status == 204, "a second close: HTTP %s" % status)
            m = new_out_trade_no()
            sim.create(m, 5)
            sim.pay(m)
            status, text = c.close(out_trade_no=m)
            expect(status == 400 and json.loads(text)["code"] == "ORDERPAID",
                   "close of a paid order: HTTP %s %s" % (status, text))
        return check

    r.check("public key mode: close an order (signed 204), then it is CLOSED", close(pk))
    r.check("certificate mode: close an order",
            close(state["cert"]) if "cert" in state else lambda: expect(False, "no client"))

    def refuses(fault):
        def check():
            n = new_out_trade_no()
            sim.create(n, 1)
            sim.faults(endpoint="orderquery", **{fault: 1})
            try:
                pk.query(out_trade_no=n)
            except Exception as e:
                expect("verify" in str(e), "unexpected error %r" % e)
            else:
                raise CheckFailed("the SDK accepted an answer with %s" % fault)
            finally:
                sim.faults(endpoint="orderquery")
        return check

    r.check("the SDK refuses a bad signature (bad_sign_rate)", refuses("bad_sign_rate"))
    r.check("the SDK refuses a WECHATPAY/SIGNTEST/ probe (signtest_rate)",
            refuses("signtest_rate"))

    def rotation():
        sim.keys(certificates=[CERT_F576, CERT_D7CE], sign_with=CERT_D7CE)
        try:
            c = client(base_url, "certificates")
            serials = sorted("%X" % cert.serial_number for cert in c._core._certificates)
            expect(serials == sorted([CERT_F576, CERT_D7CE]), "certificates %s" % serials)
            n = new_out_trade_no()
            sim.create(n, 3)
            status, text = c.query(out_trade_no=n)
            expect_ok(status, text)
        finally:
            sim.keys(certificates=[CERT_F576], sign_with=CERT_F576)

    r.check("certificate rotation: both certificates served, answers under the new one verify",
            rotation)

    def public_key_only():
        sim.keys(mode="public_key")
        try:
            status, text = pk._core.request("/v3/certificates")
            expect(status == 404 and json.loads(text)["code"] == "RESOURCE_NOT_EXISTS",
                   "HTTP %s %s" % (status, text))
            n = new_out_trade_no()
            sim.create(n, 2)
            status, text = pk.query(out_trade_no=n)
            expect_ok(status, text)
        finally:
            sim.keys(mode="both", sign_with=CERT_F576)

    r.check("public key only: /v3/certificates is RESOURCE_NOT_EXISTS, queries still verify",
            public_key_only)

    def bill(c, label, bill_date):
        def check():
            n = new_out_trade_no()
            sim.create(n, 4321)
            sim.pay(n, paid_at="%sT08:09:10+08:00" % bill_date)
            # trade_bill: bill_type ALL, tar_type GZIP; the SDK verifies the 2xx answer or raises.
            status, text = c.trade_bill(bill_date=bill_date)
            expect_ok(status, text)
            answer = json.loads(text)
            expect(answer["hash_type"] == "SHA1", "%s: %s" % (label, answer))
            url = answer["download_url"]
            expect(url.startswith(base_url.rstrip("/") + "/v3/billdownload/file?token="),
                   "download_url %s" % url)
            # download_bill: a request signed over the URL's path and query, an unsigned answer.
            status, content = c.download_bill(url)
            expect(status == 200, "download: HTTP %s %r" % (status, content[:200]))
            expect(isinstance(content, bytes) and content[:2] == b"\x1f\x8b",
                   "not gzip: %r" % content[:8])
            text = gzip.decompress(content)
            expect(hashlib.sha1(text).hexdigest() == answer["hash_value"],
                   "hash_value is not the SHA-1 of the decompressed bill")
            lines = text.decode("utf-8").split("\r\n")
            expect(lines[0].startswith("\ufeff交易时间,"), "header %r" % lines[0][:20])
            row = lines[1][1:].split(",`")
            expect(len(row) == 27 and row[6] == n and row[9] == "SUCCESS" and row[12] == "43.21",
                   "row %r" % row)
            expect(lines[-2] == "`1,`43.21,`0.00,`0.00,`0.26000,`43.21,`0.00",
                   "summary %r" % lines[-2])
            status, text = c.trade_bill(bill_date="2024-01-01")
            expect(status == 400 and json.loads(text)["code"] == "NO_STATEMENT_EXIST",
                   "a quiet day: HTTP %s %s" % (status, text))
        return check

    r.check("public key mode: trade_bill verified, download_bill's file matches hash_value",
            bill(pk, "public key", "2024-07-09"))
    r.check("certificate mode: trade_bill verified, download_bill's file matches hash_value",
            bill(state["cert"], "certificate", "2024-07-10")
            if "cert" in state else lambda: expect(False, "no client"))

    def notification(c, sign_with, label):
        def check():
            sim.call("PUT", "/_sim/config", {"notify_retry_ms": [200, 200]})
            sim.keys(sign_with=sign_with)
            receiver = Receiver(fail_first=1)
            try:
                n = new_out_trade_no()
                sim.create(n, 4321, notify_url=receiver.url)
                paid = sim.pay(n, notify="deliver")
                got = receiver.wait_for(2)  # the first answer was a 500: WeChat retries
                for path, headers, body in got:
                    expect(path == "/wxpay/v3/notify", "path %s" % path)
                    expect(headers.get("Wechatpay-Serial") == sign_with,
                           "serial %s" % headers.get("Wechatpay-Serial"))
                    data = c.callback(headers, body)  # verifies the signature, then decrypts
                    expect(data is not None, "%s: the SDK did not verify the notification" % label)
                    expect(data["event_type"] == "TRANSACTION.SUCCESS", "event %s" % data)
                    t = data["resource"]
                    expect(t["out_trade_no"] == n and t["trade_state"] == "SUCCESS", "%s" % t)
                    expect(t["transaction_id"] == paid["transaction_id"], "%s" % t)
                    expect(t["amount"]["total"] == 4321, "amount %s" % t)
                    tampered = body.replace(b'"summary"', b'"Summary"')
                    expect(c.callback(headers, tampered) is None,
                           "a tampered notification verified")
                time.sleep(0.5)
                expect(len(receiver.got) == 2, "delivered again after a 204")
            finally:
                receiver.close()
                sim.keys(sign_with=CERT_F576)
        return check

    r.check("public key mode: a notification (under the public key id) verifies and decrypts",
            notification(pk, PUBLIC_KEY_ID, "public key"))
    r.check("certificate mode: a notification (under the certificate) verifies and decrypts",
            notification(state["cert"], CERT_F576, "certificate")
            if "cert" in state else lambda: expect(False, "no client"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", required=True,
                    help="simulator base URL, e.g. http://127.0.0.1:18080/")
    args = ap.parse_args()
    r = Runner()
    run(r, args.base_url)
    print("%d passed, %d failed" % (r.passed, r.failed))
    return 0 if r.failed == 0 and r.passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
