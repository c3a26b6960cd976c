"""Stock libzmq SUBs (pyzmq), one per zip, on the pub/sub proxy's XPUB.

Usage: stock_subs.py ENDPOINT SECONDS ZIP [ZIP ...]. Prints `ready subs=N` once every SUB is
connected and subscribed (sent, not yet known to have arrived), receives for SECONDS (or until
SIGTERM), then prints one JSON line: `start_unix_ms` (when the subscriptions were made),
`bucket_ms` (100) and per zip `received`, `wrong` (not that zip, or not two frames),
`first_ms` (from the start to its first update, null if none) and `counts`, the updates received
per bucket since the start. SIGKILL it to make a subscriber vanish without unsubscribing.
"""
import json
import signal
import sys
import time

import zmq

BUCKET_MS = 100

endpoint, seconds, zips = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
ctx = zmq.Context()
subs = {}
poller = zmq.Poller()
for z in zips:
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    s.setsockopt(zmq.SUBSCRIBE, z.encode())
    subs[s] = z
    poller.register(s, zmq.POLLIN)
start = time.time()
print(f"ready subs={len(zips)}", flush=True)
stats = {z: {"received": 0, "wrong": 0, "first_ms": None, "counts": []} for z in zips}
stopped = False


def stop(*_):
    global stopped
    stopped = True


signal.signal(signal.SIGTERM, stop)
deadline = start + seconds
while not stopped:
    left = deadline - time.time()
    if left <= 0:
        break
    for s, _ in poller.poll(timeout=min(left, 0.1) * 1000):
        z = subs[s]
        st = stats[z]
        # Everything ready on this socket, without a poll per message.
        while True:
            try:
                frames = s.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            now_ms = (time.time() - start) * 1000
            if frames[0].decode(errors="replace") != z or len(frames) != 2:
                st["wrong"] += 1
                continue
            st["received"] += 1
            if st["first_ms"] is None:
                st["first_ms"] = round(now_ms)
            bucket = int(now_ms // BUCKET_MS)
            counts = st["counts"]
            if len(counts) <= bucket:
                counts.extend([0] * (bucket + 1 - len(counts)))
            counts[bucket] += 1
print(
    json.dumps({"start_unix_ms": round(start * 1000), "bucket_ms": BUCKET_MS, "zips": stats}),
    flush=True,
)
