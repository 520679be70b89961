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
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

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


def run(dest, manifest, *extra, retries="3"):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    path = dest + ".manifest.json"
    with open(path, "w") as f:
        json.dump(manifest, f)
    cmd = [FLASHGPT, "data", "download", "--dest", dest, "--manifest", path, "--retries", retries, "--timeout", "30",
           *extra]
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

    # 8. Hostile archives: every entry that could land outside --dest is refused by name.
    def tar_with(entry, data=b"", fmt=tarfile.GNU_FORMAT):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", format=fmt) as tar:
            ok = tarfile.TarInfo("training/ok.txt")
            ok.size = 3
            tar.addfile(ok, io.BytesIO(b"ok\n"))
            entry.size = len(data) if entry.type == tarfile.REGTYPE else 0
            tar.addfile(entry, io.BytesIO(data) if data else None)
        return buffer.getvalue()

    def info(name, kind=tarfile.REGTYPE, link=""):
        i = tarfile.TarInfo(name)
        i.type = kind
        i.linkname = link
        return i

    hostile = {
        "dotdot.tgz": (info("training/../../escaped.txt"), "'..' in the path"),
        "absolute.tgz": (info(os.path.join(tmp, "absolute-escaped.txt")), "absolute path"),
        "symlink-out.tgz": (info("training/link", tarfile.SYMTYPE, "../../.."), "outside the destination"),
        "symlink-abs.tgz": (info("training/etc", tarfile.SYMTYPE, "/etc"), "symbolic link to the absolute path"),
        "hardlink-out.tgz": (info("training/passwd", tarfile.LNKTYPE, "/etc/passwd"), "hard link to '/etc/passwd'"),
        "hardlink-dotdot.tgz": (info("training/h", tarfile.LNKTYPE, "../outside"), "hard link to '../outside'"),
        "chardev.tgz": (info("training/null", tarfile.CHRTYPE), "character device"),
        "blockdev.tgz": (info("training/sda", tarfile.BLKTYPE), "block device"),
        "fifo.tgz": (info("training/fifo", tarfile.FIFOTYPE), "FIFO"),
    }
    for name, (entry, why) in hostile.items():
        FILES[name] = tar_with(entry, b"x" if entry.type == tarfile.REGTYPE else b"")
    # An empty name: tarfile will not write one, so patch the bytes of a one-entry tar.
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        e = tarfile.TarInfo("X")
        e.size = 0
        tar.addfile(e)
    header = bytearray(raw.getvalue())
    header[0] = 0
    header[148:156] = b"        "
    header[148:155] = ("%06o\0" % sum(header[:512])).encode()
    FILES["emptyname.tar"] = bytes(header)
    hostile["emptyname.tar"] = (None, "empty name")
    for name, (entry, why) in hostile.items():
        dest = os.path.join(tmp, "hostile", name)
        r = run(dest, [item("ok", name)])
        check(r.returncode != 0 and f"refusing the entry" in r.stderr and why in r.stderr and
              "unexpected" not in r.stderr, f"{name}: refused ({why})", r)
    outside = [p for p in ("escaped.txt", "absolute-escaped.txt", "outside") if os.path.exists(os.path.join(tmp, p))]
    check(not outside and not os.path.exists(os.path.join(tmp, "hostile", "escaped.txt")), f"nothing outside --dest {outside}")

    # A link that stays inside is fine.
    inner = info("training/alias.txt", tarfile.SYMTYPE, "ok.txt")
    FILES["inner-link.tgz"] = tar_with(inner)
    dest = os.path.join(tmp, "inner")
    r = run(dest, [item("ok", "inner-link.tgz")])
    check(r.returncode == 0 and open(os.path.join(dest, "training", "alias.txt")).read() == "ok\n",
          "a symbolic link inside --dest is unpacked", r)

    # 9. The format comes from the bytes: an HTML error page saved under the archive's name.
    FILES["page.tgz"] = b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>\n" * 20
    dest = os.path.join(tmp, "html")
    r = run(dest, [item("ok", "page.tgz")])
    check(r.returncode != 0 and "not a tar, gzip, xz or bzip2 archive" in r.stderr and "HTML" in r.stderr,
          "an HTML page named .tgz is an error", r)

    # 10. A silent server (accepts, never answers): each attempt fails on the stall timeout,
    # the message counts the attempts, and the whole run stays well under a minute.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(silent.accept()) for _ in range(16)], daemon=True).start()
    dest = os.path.join(tmp, "silent")
    started = time.monotonic()
    r = run(dest, [dict(name="slow.tgz", url=f"http://127.0.0.1:{silent.getsockname()[1]}/slow.tgz")],
            "--stall-timeout", "1", retries="1")
    took = time.monotonic() - started
    check(r.returncode != 0 and "2 of 2 attempts made" in r.stderr and "attempt 1 of 2 failed" in r.stderr
          and "attempt 3" not in r.stderr and took < 20, f"a silent server fails in {took:.1f} s, attempts counted", r)

    # 11. Numbers out of range are refused before anything is fetched.
    for retries, args, what in (("-1", [], "--retries"), ("3", ["--stall-timeout", "0"], "--stall-timeout"),
                                ("3", ["--timeout", "-5"], "--timeout")):
        r = run(os.path.join(tmp, "neg"), [item("ok", "good.tgz")], *args, retries=retries)
        check(r.returncode != 0 and what in r.stderr and "unexpected" not in r.stderr, f"{what} out of range refused", r)

    server.shutdown()
    subprocess.run(["rm", "-rf", tmp])
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed")
        sys.exit(1)
    print("all download checks passed")


if __name__ == "__main__":
    main()
