#!/usr/bin/env python3
"""Interop check: the third-party Python SDK `wechatpy` against `wxpay-reconciler simulate`.

Proves that an unmodified wechatpy client (see requirements.txt for the pinned version)
can place, query and close orders at the simulator with both v2 sign types (MD5 and
HMAC-SHA256), and that every reply the simulator sends is signed correctly according to
wechatpy's own signature code; and that wechatpy's `tools.download_bill` gets the day's bill
(plain, and gzip with tar_type=GZIP) in WeChat's format.

    python3 -m venv .venv-interop
    .venv-interop/bin/pip install -r tests/interop/requirements.txt
    wxpay-reconciler simulate --listen 127.0.0.1:18080 &
    .venv-interop/bin/python tests/interop/wechatpy_interop.py --base-url http://127.0.0.1:18080/

Prints one line per check and finally `N passed, N failed`; exits 0 only when nothing
failed. Uses only the standard library and wechatpy.

How the sign type is chosen (wechatpy 1.8.x): WeChatPay._request signs with
calculate_signature_hmac when the request dict carries sign_type=HMAC-SHA256 and with
calculate_signature (MD5) otherwise, and it never adds sign_type by itself.
`order.create` forwards **kwargs into the request dict, so sign_type is passed there;
`order.query` / `order.close` take no extra arguments, so for HMAC the same request dict
they would build is posted through the client's public `post()` with sign_type added.
wechatpy does not check reply signatures itself; its only checker (`check_signature`) is
MD5-only, so HMAC replies are checked with its `calculate_signature_hmac`.
"""

import argparse
import gzip
import json
import secrets
import sys
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET

from wechatpy.exceptions import WeChatPayException
from wechatpy.pay import WeChatPay
from wechatpy.pay.utils import calculate_signature, calculate_signature_hmac

# The simulator's built-in test merchants (public sample credentials from WeChat's docs).
MERCHANTS = [
    {
        "label": "md5",
        "mch_id": "10000100",
        "appid": "wxd930ea5d5a258f4f",
        "key": "192006250b4c09247ec02edce69f6a2d",
        "sign_type": "MD5",
        "fee": 101,
    },
    {
        "label": "hmac",
        "mch_id": "1900000109",
        "appid": "wx2421b1c4370ec43b",
        "key": "8934e7d15453e97507ef794cf7b0519d",
        "sign_type": "HMAC-SHA256",
        "fee": 2345,
    },
]
WRONG_KEY = "0123456789abcdef0123456789abcdef"
OPENID = "oUpF8uMEb4qRXf22hE3X68TekukE"
NOTIFY_URL = "http://127.0.0.1:9/notify"
SECRETS = [m["key"] for m in MERCHANTS] + [WRONG_KEY]


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
    return "py" + secrets.token_hex(14)  # 30 chars, WeChat allows up to 32


def xml_to_dict(text):
    """Flat <xml> document -> dict (stdlib only; used for raw request/response bodies)."""
    root = ET.fromstring(text)
    expect(root.tag == "xml", "root element is <%s>, not <xml>" % root.tag)
    return {child.tag: child.text for child in root}


class Session:
    """One merchant: a wechatpy client plus a log of the raw HTTP exchanges it made."""

    def __init__(self, merchant, base_url, api_key):
        self.m = merchant
        self.sign_type = merchant["sign_type"]
        self.api_key = api_key
        self.exchanges = []
        self.client = WeChatPay(
            appid=merchant["appid"],
            api_key=api_key,
            mch_id=merchant["mch_id"],
            timeout=10,
        )
        # wechatpy builds URLs as API_BASE_URL + 'pay/orderquery', so it must end with '/'.
        self.client.API_BASE_URL = base_url
        self.client._http.hooks["response"].append(self._record)

    def _record(self, response, *args, **kwargs):
        self.exchanges.append(response)

    def _extra(self):
        return {"sign_type": self.sign_type} if self.sign_type != "MD5" else {}

    # --- the three WeChat v2 calls, through wechatpy -----------------------------------
    def unifiedorder(self, out_trade_no, total_fee):
        return self.client.order.create(
            trade_type="JSAPI",
            body="wechatpy interop",
            total_fee=total_fee,
            notify_url=NOTIFY_URL,
            client_ip="127.0.0.1",  # else wechatpy resolves api.mch.weixin.qq.com
            user_id=OPENID,
            out_trade_no=out_trade_no,
            **self._extra()
        )

    def orderquery(self, out_trade_no, sign_type_field=None):
        if self.sign_type == "MD5" and sign_type_field is None:
            return self.client.order.query(out_trade_no=out_trade_no)
        data = {"appid": self.client.appid, "out_trade_no": out_trade_no}
        data["sign_type"] = sign_type_field or self.sign_type
        return self.client.post("pay/orderquery", data=data)

    def closeorder(self, out_trade_no):
        if self.sign_type == "MD5":
            return self.client.order.close(out_trade_no)
        data = {"appid": self.client.appid, "out_trade_no": out_trade_no}
        data["sign_type"] = self.sign_type
        return self.client.post("pay/closeorder", data=data)

    # --- verification with wechatpy's own signature code ---------------------------------
    def signature_ok(self, params, sign_type=None):
        sign_type = sign_type or self.sign_type
        if sign_type == "HMAC-SHA256":
            unsigned = {k: v for k, v in params.items() if k != "sign"}
            return params.get("sign") == calculate_signature_hmac(unsigned, self.api_key)
        # MD5: wechatpy's own checker (WeChatPay.check_signature -> _check_signature)
        return self.client.check_signature(params)

    def check_last_request(self, endpoint, sign_type=None, explicit_md5=False):
        """The request wechatpy just sent went to the right path and carried/was signed
        with the intended sign type."""
        sign_type = sign_type or self.sign_type
        expect(self.exchanges, "no HTTP exchange was recorded")
        req = self.exchanges[-1].request
        expect(req.url.endswith("/" + endpoint), "request went to %s" % req.url)
        sent = xml_to_dict(req.body.decode("utf-8") if isinstance(req.body, bytes) else req.body)
        if sign_type == "HMAC-SHA256" or explicit_md5:
            expect(sent.get("sign_type") == sign_type,
                   "request carried sign_type=%r, wanted %r" % (sent.get("sign_type"), sign_type))
        else:
            expect("sign_type" not in sent, "MD5 request unexpectedly carried sign_type")
        unsigned = {k: v for k, v in sent.items() if k != "sign"}
        calc = calculate_signature_hmac if sign_type == "HMAC-SHA256" else calculate_signature
        expect(sent.get("sign") == calc(unsigned, self.api_key),
               "request was not signed with %s" % sign_type)

    def verify_reply(self, data, sign_type=None):
        expect(isinstance(data, dict), "wechatpy returned %r, not a parsed reply" % type(data))
        expect(data.get("sign"), "reply has no sign")
        expect(self.signature_ok(data, sign_type),
               "reply signature does not verify with %s" % (sign_type or self.sign_type))
        expect(data.get("return_code") == "SUCCESS", "return_code=%r" % data.get("return_code"))
        expect(data.get("appid") == self.m["appid"], "reply appid=%r" % data.get("appid"))
        expect(data.get("mch_id") == self.m["mch_id"], "reply mch_id=%r" % data.get("mch_id"))
        expect(data.get("nonce_str"), "reply has no nonce_str")

    def verify_success(self, data, sign_type=None):
        self.verify_reply(data, sign_type)
        expect(data.get("result_code") == "SUCCESS",
               "result_code=%r err_code=%r" % (data.get("result_code"), data.get("err_code")))

    def verify_exception_reply(self, exc):
        """A business failure (return_code SUCCESS, result_code FAIL) is still signed."""
        expect(exc.response is not None, "exception carries no HTTP response")
        data = xml_to_dict(exc.response.content.decode("utf-8"))
        self.verify_reply(data)
        return data


class Runner:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every exception is a failed check
            self.failed += 1
            detail = "%s: %s" % (type(e).__name__, e) if not isinstance(e, CheckFailed) else str(e)
            print("FAIL %s: %s" % (name, redact(detail)), flush=True)
        else:
            self.passed += 1
            print("ok  %s" % name, flush=True)


def control_pay(base_url, mch_id, out_trade_no, paid_at=None):
    url = "%s_sim/orders/%s/%s/pay" % (base_url, mch_id, out_trade_no)
    body = {"notify": "drop"}
    if paid_at:
        body["paid_at"] = paid_at
    body = json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        raise CheckFailed("control API %s -> HTTP %s: %s"
                          % (url, e.code, e.read().decode("utf-8", "replace")[:300]))


def expect_pay_exception(fn, what):
    try:
        result = fn()
    except WeChatPayException as e:
        return e
    raise CheckFailed("%s: wechatpy did not raise, got %r" % (what, result))


def run_merchant(r, m, base_url):
    L = m["label"]
    s = Session(m, base_url, m["key"])
    st = {}

    # --- order A: unifiedorder -> NOTPAY -> pay -> SUCCESS --------------------------------
    def unifiedorder():
        st["a"] = new_out_trade_no()
        data = s.unifiedorder(st["a"], m["fee"])
        s.check_last_request("pay/unifiedorder")
        s.verify_success(data)
        expect(data.get("prepay_id"), "no prepay_id")
        expect(data.get("trade_type") == "JSAPI", "trade_type=%r" % data.get("trade_type"))
        st["a_created"] = True

    r.check("%s: unifiedorder signed reply" % L, unifiedorder)

    def query_notpay():
        expect(st.get("a_created"), "prerequisite failed (unifiedorder)")
        data = s.orderquery(st["a"])
        s.check_last_request("pay/orderquery")
        s.verify_success(data)
        expect(data.get("out_trade_no") == st["a"], "out_trade_no=%r" % data.get("out_trade_no"))
        expect(data.get("trade_state") == "NOTPAY", "trade_state=%r" % data.get("trade_state"))

    r.check("%s: orderquery before payment is NOTPAY, signed reply" % L, query_notpay)

    if m["sign_type"] == "MD5":
        def query_explicit_md5():
            expect(st.get("a_created"), "prerequisite failed (unifiedorder)")
            data = s.orderquery(st["a"], sign_type_field="MD5")
            s.check_last_request("pay/orderquery", explicit_md5=True)
            s.verify_success(data, "MD5")
            expect(data.get("trade_state") == "NOTPAY", "trade_state=%r" % data.get("trade_state"))

        r.check("%s: orderquery with explicit sign_type=MD5, signed reply" % L, query_explicit_md5)

    def pay():
        expect(st.get("a_created"), "prerequisite failed (unifiedorder)")
        out = control_pay(base_url, m["mch_id"], st["a"])
        tid = out.get("transaction_id") if isinstance(out, dict) else None
        expect(isinstance(tid, str) and tid, "control API answered %r" % (out,))
        st["tid"] = tid

    r.check("%s: customer pays via control API" % L, pay)

    def query_paid():
        expect(st.get("tid"), "prerequisite failed (payment)")
        data = s.orderquery(st["a"])
        s.check_last_request("pay/orderquery")
        s.verify_success(data)
        expect(data.get("trade_state") == "SUCCESS", "trade_state=%r" % data.get("trade_state"))
        expect(int(data.get("total_fee")) == m["fee"],
               "total_fee=%r, ordered %d" % (data.get("total_fee"), m["fee"]))
        expect(data.get("transaction_id") == st["tid"],
               "transaction_id=%r, control API said %r" % (data.get("transaction_id"), st["tid"]))
        expect(data.get("out_trade_no") == st["a"], "out_trade_no=%r" % data.get("out_trade_no"))

    r.check("%s: orderquery after payment is SUCCESS with amount and transaction_id" % L,
            query_paid)

    # --- order B: unifiedorder -> closeorder -> CLOSED ------------------------------------
    def close():
        st["b"] = new_out_trade_no()
        s.verify_success(s.unifiedorder(st["b"], 1))
        data = s.closeorder(st["b"])
        s.check_last_request("pay/closeorder")
        s.verify_success(data)
        st["b_closed"] = True

    r.check("%s: closeorder signed reply" % L, close)

    def query_closed():
        expect(st.get("b_closed"), "prerequisite failed (closeorder)")
        data = s.orderquery(st["b"])
        s.verify_success(data)
        expect(data.get("trade_state") == "CLOSED", "trade_state=%r" % data.get("trade_state"))

    r.check("%s: orderquery after close is CLOSED" % L, query_closed)

    # --- unknown order ---------------------------------------------------------------------
    def unknown():
        otn = new_out_trade_no()
        e = expect_pay_exception(lambda: s.orderquery(otn), "orderquery of unknown order")
        s.check_last_request("pay/orderquery")
        expect(e.return_code == "SUCCESS", "return_code=%r" % e.return_code)
        expect(e.result_code == "FAIL", "result_code=%r" % e.result_code)
        expect(e.errcode == "ORDERNOTEXIST", "err_code=%r (%r)" % (e.errcode, e.errmsg))
        s.verify_exception_reply(e)

    r.check("%s: orderquery of unknown order raises ORDERNOTEXIST, signed reply" % L, unknown)

    # --- wrong API key ---------------------------------------------------------------------
    def wrong_key():
        bad = Session(m, base_url, WRONG_KEY)
        # an order that exists and is open, to see that a forged close does nothing
        d = new_out_trade_no()
        s.verify_success(s.unifiedorder(d, 1))
        c = new_out_trade_no()
        attempts = [
            ("unifiedorder", "pay/unifiedorder", lambda: bad.unifiedorder(c, 1)),
            ("orderquery", "pay/orderquery", lambda: bad.orderquery(d)),
            ("closeorder", "pay/closeorder", lambda: bad.closeorder(d)),
        ]
        for what, endpoint, fn in attempts:
            e = expect_pay_exception(fn, "%s with wrong key" % what)
            bad.check_last_request(endpoint)  # it really was sent, signed with the wrong key
            expect(e.return_code == "FAIL",
                   "%s with wrong key: return_code=%r result_code=%r err_code=%r"
                   % (what, e.return_code, e.result_code, e.errcode))
        # nothing changed: the forged unifiedorder created nothing, the forged close closed nothing
        e = expect_pay_exception(lambda: s.orderquery(c), "orderquery of forged order")
        expect(e.errcode == "ORDERNOTEXIST",
               "forged unifiedorder created an order? err_code=%r" % e.errcode)
        s.verify_exception_reply(e)
        data = s.orderquery(d)
        s.verify_success(data)
        expect(data.get("trade_state") == "NOTPAY",
               "forged closeorder changed the order: trade_state=%r" % data.get("trade_state"))

    r.check("%s: wrong api key is rejected with return_code FAIL and changes nothing" % L,
            wrong_key)

    # --- the daily bill: downloadbill ---------------------------------------------------------
    # wechatpy's tools.download_bill(bill_date) posts bill_type=ALL without tar_type (and signs
    # with MD5, which WeChat accepts from every merchant); a reply that is not XML is handed back
    # as text. The GZIP variant goes through the client's post() with tar_type added.
    bill_day = {"md5": "20240709", "hmac": "20240710"}[L]
    iso_day = "%s-%s-%s" % (bill_day[:4], bill_day[4:6], bill_day[6:])

    def bill_lines(text):
        expect(text.startswith("\ufeff交易时间,公众账号ID,商户号,"), "no BOM + header: %r" % text[:40])
        expect(text.endswith("\r\n") and text.count("\n") == text.count("\r\n"), "not CRLF")
        lines = text[1:].rstrip("\r\n").split("\r\n")
        expect(len(lines[0].split(",")) == 27, "header of %d columns" % len(lines[0].split(",")))
        expect(lines[-2].startswith("总交易单数,"), "no summary title: %r" % lines[-2])
        return lines

    def download_bill():
        n = new_out_trade_no()
        s.verify_success(s.unifiedorder(n, 1234))
        control_pay(base_url, m["mch_id"], n, "%sT12:34:56+08:00" % iso_day)
        text = s.client.tools.download_bill(bill_day)
        expect(isinstance(text, str), "wechatpy returned %r, not the bill's text" % type(text))
        s.check_last_request("pay/downloadbill", sign_type="MD5")
        lines = bill_lines(text)
        rows = [l[1:].split(",`") for l in lines[1:-2]]
        expect(len(rows) == 1 and len(rows[0]) == 27, "rows %r" % rows)
        row = rows[0]
        expect(row[0] == "%s 12:34:56" % iso_day and row[2] == m["mch_id"] and row[6] == n
               and row[9] == "SUCCESS" and row[12] == "12.34" and row[22] == "0.07000",
               "row %r" % row)
        expect(lines[-1] == "`1,`12.34,`0.00,`0.00,`0.07000,`12.34,`0.00",
               "summary %r" % lines[-1])
        st["bill_text"] = text

    r.check("%s: downloadbill through wechatpy: the day's bill, BOM, CRLF, backticks, summary" % L,
            download_bill)

    def download_bill_gzip():
        expect(st.get("bill_text"), "prerequisite failed (downloadbill)")
        data = {"appid": s.client.appid, "bill_date": bill_day, "bill_type": "ALL",
                "tar_type": "GZIP"}
        data.update(s._extra())
        s.client.post("pay/downloadbill", data=data)
        s.check_last_request("pay/downloadbill")
        raw = s.exchanges[-1].content
        expect(raw[:2] == b"\x1f\x8b", "not gzip: %r" % raw[:8])
        expect(gzip.decompress(raw).decode("utf-8") == st["bill_text"],
               "the gzip bill differs from the plain one")

    r.check("%s: downloadbill tar_type=GZIP is the same bill, gzipped" % L, download_bill_gzip)

    def no_bill():
        e = expect_pay_exception(lambda: s.client.tools.download_bill("20240101"),
                                 "downloadbill of a quiet day")
        expect(e.return_code == "FAIL", "return_code=%r" % e.return_code)
        expect(e.return_msg == "No Bill Exist", "return_msg=%r" % e.return_msg)

    r.check("%s: downloadbill of a quiet day is FAIL No Bill Exist" % L, no_bill)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", required=True,
                    help="simulator base URL, e.g. http://127.0.0.1:18080/")
    args = ap.parse_args()
    base_url = args.base_url.rstrip("/") + "/"

    r = Runner()
    for m in MERCHANTS:
        run_merchant(r, m, base_url)
    print("%d passed, %d failed" % (r.passed, r.failed))
    return 0 if r.failed == 0 and r.passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
