#!/usr/bin/env python3
"""`flashgpt data download` against a local HTTP server on 127.0.0.1 serving generated
fixture archives: a clean fetch, a connection dropped mid-file (resumed with Range), a
leftover .part, a server that ignores Range, a checksum mismatch, a corrupt archive and
a 404. Usage: download_test.py PATH/TO/flashgpt"""
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading

FLASHGPT = sys.argv[1]
REQUESTS = []  # (path, Range header or None)
DROPPED = set()
FILES = {}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        mode, _, name = self.path.strip("/").partition("/")
        REQUESTS.append((self.path, self.headers.get("Range")))
        body = FILES.get(name)
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and mode != "norange":
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        part = body[start:]
        self.send_header("Content-Length", str(len(part)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if mode == "drop" and name not in DROPPED:
            DROPPED.add(name)  # promise the whole body, send 40% of it, hang up
            self.wfile.write(part[: len(part) * 2 // 5])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        try:
            self.wfile.write(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on this reply (expected when it restarts a download)


def make_tgz(files):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def run(dest, manifest, *extra):
    path = dest + ".manifest.json"
    with open(path, "w") as f:
        json.dump(manifest, f)
    cmd = [FLASHGPT, "data", "download", "--dest", dest, "--manifest", path, "--retries", "3", "--timeout", "30", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


FAILURES = []


def check(condition, what, result=None):
    if condition:
        print(f"ok: {what}")
    else:
        FAILURES.append(what)
        print(f"FAIL: {what}" + (f"\n  stdout: {result.stdout}\n  stderr: {result.stderr}" if result else ""))


def main():
    # ~1.5 MB of poorly compressible text, so that a drop at 40% lands mid-file.
    lines_en = [f"line {i} {hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(20000)]
    good = make_tgz({"training/toy.fr-en.en": "\n".join(lines_en) + "\n",
                     "training/toy.fr-en.fr": "\n".join(l.replace("line", "ligne") for l in lines_en) + "\n"})
    FILES["good.tgz"] = good
    corrupt = bytearray(good)
    for i in range(len(corrupt) // 2, len(corrupt) // 2 + 64):
        corrupt[i] ^= 0xA5
    FILES["corrupt.tgz"] = bytes(corrupt)
    FILES["truncated.tgz"] = good[: len(good) * 3 // 4]
    sha = hashlib.sha256(good).hexdigest()
    md5 = hashlib.md5(good).hexdigest()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    tmp = tempfile.mkdtemp(prefix="flashgpt_download_")

    def item(mode, name, **sums):
        return dict(name=name, url=f"{base}/{mode}/{name}", **sums)

    # 1. A clean fetch, verified by sha256 and md5, unpacked, recorded.
    dest = os.path.join(tmp, "clean")
    r = run(dest, [item("ok", "good.tgz", sha256=sha, md5=md5, size=len(good))])
    check(r.returncode == 0, "clean download succeeds", r)
    check(os.path.exists(os.path.join(dest, "training", "toy.fr-en.fr")), "archive unpacked", r)
    check(not os.path.exists(os.path.join(dest, "good.tgz.part")), "no .part left")
    manifest = json.load(open(os.path.join(dest, "manifest.json")))
    check(manifest["good.tgz"]["sha256"] == sha and manifest["good.tgz"]["unpacked"], "manifest records sha256")
    before = len(REQUESTS)
    r = run(dest, [item("ok", "good.tgz")])
    check(r.returncode == 0 and len(REQUESTS) == before and "already here, verified" in r.stderr,
          "second run verifies against the recorded sha256 without fetching", r)

    # 2. The connection drops mid-file: the next attempt resumes with a Range request.
    dest = os.path.join(tmp, "drop")
    REQUESTS.clear()
    r = run(dest, [item("drop", "good.tgz", sha256=sha)])
    check(r.returncode == 0, "download survives a dropped connection", r)
    ranges = [rng for path, rng in REQUESTS if rng]
    check(len(REQUESTS) == 2 and ranges and ranges[0].startswith("bytes=") and not ranges[0].startswith("bytes=0-"),
          f"second request resumed with a Range ({REQUESTS})")
    check(open(os.path.join(dest, "good.tgz"), "rb").read() == good, "resumed file is byte-identical")

    # 3. A .part from an interrupted earlier run is resumed, not restarted.
    dest = os.path.join(tmp, "part")
    os.makedirs(dest)
    open(os.path.join(dest, "good.tgz.part"), "wb").write(good[:12345])
    REQUESTS.clear()
    r = run(dest, [item("ok", "good.tgz", sha256=sha)])
    check(r.returncode == 0 and REQUESTS == [("/ok/good.tgz", "bytes=12345-")], f"leftover .part resumed ({REQUESTS})", r)

    # 4. A server that ignores Range answers 200: the file is started over, not appended to.
    dest = os.path.join(tmp, "norange")
    os.makedirs(dest)
    open(os.path.join(dest, "good.tgz.part"), "wb").write(good[:5000])
    r = run(dest, [item("norange", "good.tgz", sha256=sha)])
    check(r.returncode == 0 and open(os.path.join(dest, "good.tgz"), "rb").read() == good
          and "starting over" in r.stderr, "200 reply to a Range request restarts the file", r)

    # 5. A published checksum that does not match: refused, file set aside.
    dest = os.path.join(tmp, "badsum")
    r = run(dest, [item("ok", "good.tgz", md5="0" * 32)])
    check(r.returncode != 0 and "does not match the published" in r.stderr, "md5 mismatch is an error", r)
    check(os.path.exists(os.path.join(dest, "good.tgz.corrupt")) and not os.path.exists(os.path.join(dest, "good.tgz")),
          "mismatching file moved to .corrupt")

    # 6. Archives without a known checksum that are corrupt or truncated: clear errors.
    for name in ("corrupt.tgz", "truncated.tgz"):
        dest = os.path.join(tmp, name)
        r = run(dest, [item("ok", name)])
        check(r.returncode != 0 and "corrupt or truncated archive" in r.stderr and name in r.stderr,
              f"{name} is reported as a corrupt archive", r)
        m = json.load(open(os.path.join(dest, "manifest.json")))
        check(name not in m and os.path.exists(os.path.join(dest, name + ".corrupt")),
              f"{name} forgotten so that a re-run fetches it again")

    # 7. A missing file: a clear error naming it, bounded attempts.
    dest = os.path.join(tmp, "missing")
    REQUESTS.clear()
    r = run(dest, [item("ok", "nope.tgz")])
    check(r.returncode != 0 and "cannot download nope.tgz" in r.stderr and "404" in r.stderr and len(REQUESTS) == 1,
          "404 is an error without retries", r)

    server.shutdown()
    subprocess.run(["rm", "-rf", tmp])
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed")
        sys.exit(1)
    print("all download checks passed")


if __name__ == "__main__":
    main()
