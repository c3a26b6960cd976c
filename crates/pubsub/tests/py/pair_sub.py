"""A stock libzmq SUB (pyzmq) connected to both proxies of a pair.

Usage: pair_sub.py SECONDS ZIP ENDPOINT [ENDPOINT ...]. One SUB socket, connected to every
endpoint, subscribed to ZIP. Prints `ready endpoints=N` once connected and subscribed, receives
for SECONDS (or until SIGTERM), then prints one JSON line: `received` (every message the SUB
delivered), `distinct` (distinct (publisher, instance, seq)), `once` and `twice` (how many of those
came once, twice), `more` (more than twice), `start_unix_ms`, `bucket_ms` (100) and, per bucket,
`copies` (messages delivered) and `distinct_counts` (first copies).
"""
import json
import signal
import sys
import time

import zmq

BUCKET_MS = 100

seconds, zip_code, endpoints = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
ctx = zmq.Context()
s = ctx.socket(zmq.SUB)
s.setsockopt(zmq.LINGER, 0)
for e in endpoints:
    s.connect(e)
s.setsockopt(zmq.SUBSCRIBE, zip_code.encode())
start = time.time()
print(f"ready endpoints={len(endpoints)}", flush=True)
seen = {}
copies, firsts = [], []
stopped = False


def stop(*_):
    global stopped
    stopped = True


def bump(counts, i):
    while len(counts) <= i:
        counts.append(0)
    counts[i] += 1


signal.signal(signal.SIGTERM, stop)
deadline = start + seconds
received = 0
while not stopped and time.time() < deadline:
    if not s.poll(100):
        continue
    while True:
        try:
            frames = s.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            break
        if len(frames) != 2:
            continue
        received += 1
        fields = frames[1].split()
        key = (fields[0], fields[1], int(fields[2]))
        n = seen.get(key, 0) + 1
        seen[key] = n
        i = int((time.time() - start) * 1000 // BUCKET_MS)
        bump(copies, i)
        if n == 1:
            bump(firsts, i)
counts = list(seen.values())
print(json.dumps({
    "received": received,
    "distinct": len(seen),
    "once": sum(1 for n in counts if n == 1),
    "twice": sum(1 for n in counts if n == 2),
    "more": sum(1 for n in counts if n > 2),
    "start_unix_ms": int(start * 1000),
    "bucket_ms": BUCKET_MS,
    "copies": copies,
    "distinct_counts": firsts,
}), flush=True)
