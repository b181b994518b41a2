"""Planting bad video files of every kind the pipeline must survive (real bytes, no mocks)."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import av


def faststart_copy(src: Path, dst: Path) -> Path:
    """Remux with the index (moov) first: a truncated copy then opens and fails mid-decode."""
    with av.open(str(src)) as i, av.open(str(dst), "w", options={"movflags": "faststart"}) as o:
        s = o.add_stream_from_template(i.streams.video[0])
        for pkt in i.demux(i.streams.video[0]):
            if pkt.dts is not None:
                pkt.stream = s
                o.mux(pkt)
    return dst


def plant(good: Path, folder: Path) -> dict[str, Path]:
    """Write one file of each bad kind next to nothing else; returns kind -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    out = {
        "missing": folder / "missing.mp4",
        "empty": folder / "empty.mp4",
        "truncated": folder / "truncated.mp4",
        "truncated_faststart": folder / "truncated_fs.mp4",
        "corrupt": folder / "corrupt.mp4",
        "not_video": folder / "notes.mp4",
    }
    out["empty"].write_bytes(b"")
    out["truncated"].write_bytes(data[: len(data) // 2])  # moov atom at the end is cut off
    fs = faststart_copy(good, folder / "faststart.mp4").read_bytes()
    out["truncated_faststart"].write_bytes(fs[: int(len(fs) * 0.4)])
    out["corrupt"].write_bytes(bytes(range(256)) * 8 + data[2048:])  # header overwritten
    out["not_video"].write_text("this is a text file, not a video\n" * 50)
    return out


class GatedServer:
    """A loopback HTTP server of one file (with byte ranges) that holds every request until
    `open()`: a decode of it hangs for real, which is what the per-file decode timeout must
    bound, then finishes for real once the gate opens (on `close()` at the latest)."""

    def __init__(self, data: bytes) -> None:
        self.gate = threading.Event()
        gate = self.gate

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                gate.wait()
                lo, hi = 0, len(data) - 1
                ranged = self.headers.get("Range", "").startswith("bytes=")
                if ranged:
                    a, b = self.headers["Range"][len("bytes="):].split("-")
                    lo, hi = int(a), min(int(b) if b else hi, hi)
                self.send_response(206 if ranged else 200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(hi - lo + 1))
                if ranged:
                    self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(data)}")
                self.end_headers()
                if body:
                    self.wfile.write(data[lo:hi + 1])

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/clip.mp4"

    def open(self) -> None:
        self.gate.set()

    def close(self) -> None:
        self.gate.set()  # no request is left waiting
        self.httpd.shutdown()
        self.httpd.server_close()
