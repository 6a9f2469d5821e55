"""Sets up users on a fresh `chartlog serve` for .ci/schemathesis and prints their tokens.

Usage: python3 .ci/schemathesis.py BASE_URL DATA_DIR

Prints `ROLE TOKEN` lines for a full session of each role fuzzed: the first administrator,
a physician (password + TOTP, so the second-factor flow is exercised too) and an auditor. Standard library only: it runs in the schemathesis venv.
"""

import base64
import hashlib
import hmac
import json
import ssl
import struct
import sys
import time
import urllib.error
import urllib.request

BASE_URL, DATA_DIR = sys.argv[1], sys.argv[2]
# The server's own development certificate; this is a throwaway local server.
TLS = ssl.create_default_context()
TLS.check_hostname = False
TLS.verify_mode = ssl.CERT_NONE


def call(method, path, token=None, body=None, expect=(200,)):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(BASE_URL + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(request, context=TLS, timeout=30) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    if status not in expect:
        sys.exit(f"setup: {method} {path} answered {status}: {text}")
    return json.loads(text) if text else None


def totp(secret_base32, at=None):
    key = base64.b32decode(secret_base32 + "=" * (-len(secret_base32) % 8))
    counter = int((time.time() if at is None else at) // 30)
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    code = (struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF) % 1_000_000
    return f"{code:06d}"


def passphrase(username):
    return f"fuzzing harness passphrase {len(username) * 7919} quartz"


def first_login(username, one_time):
    """One-time password -> own passphrase -> TOTP if the role needs it -> full session."""
    token = call("POST", "/auth/login", body={"username": username, "password": one_time})["token"]
    call(
        "POST",
        "/auth/password",
        token,
        {"current_password": one_time, "new_password": passphrase(username)},
        expect=(204,),
    )
    answer = call("POST", "/auth/login", body={"username": username, "password": passphrase(username)})
    if answer["session"]["stage"] == "full":
        return answer["token"]
    token = answer["token"]
    secret = call("POST", "/auth/second-factor/enrollment", token, {})["secret_base32"]
    call("POST", "/auth/second-factor/confirmation", token, {"code": totp(secret)})
    # A code is accepted once: log in with the next step's code.
    answer = call(
        "POST",
        "/auth/login",
        body={
            "username": username,
            "password": passphrase(username),
            "second_factor": totp(secret, time.time() + 30),
        },
    )
    return answer["token"]


def main():
    with open(f"{DATA_DIR}/first-administrator-password") as file:
        admin = first_login("admin", file.read().strip())
    tokens = {"administrator": admin}
    for username, role in [("dr.fuzz", "physician"), ("audit.fuzz", "auditor")]:
        created = call("POST", "/users", admin, {"username": username, "role": role}, expect=(201,))
        tokens[role] = first_login(username, created["one_time_password"])
    for role, token in tokens.items():
        print(role, token)


main()
