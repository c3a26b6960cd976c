"""A subscription flood from stock libzmq XSUBs (pyzmq) on the pub/sub proxy's XPUB.

Usage: prefix_flood.py ENDPOINT CONNS PER_CONN TAG [--pace-ms MS] [--close]. Connects CONNS XSUB
sockets, prints `ready flood=connected` once they are connected, then has each subscribe to
PER_CONN distinct prefixes `<TAG><conn>-<n>` that match no zip (a libzmq XSUB forwards every
subscribe), in ten rounds `--pace-ms` apart (default 0), and prints `{"sent": N}` when all are
queued. Then it holds its connections until killed, or with `--close` waits for them to be
written out, closes them and exits.
"""
import json
import sys
import time

import zmq

args = [a for a in sys.argv[1:] if not a.startswith("--")]
endpoint, conns, per_conn, tag = args[0], int(args[1]), int(args[2]), args[3]
pace_ms = 0
if "--pace-ms" in sys.argv:
    pace_ms = int(sys.argv[sys.argv.index("--pace-ms") + 1])
close = "--close" in sys.argv
ctx = zmq.Context()
socks = []
for _ in range(conns):
    s = ctx.socket(zmq.XSUB)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(endpoint)
    socks.append(s)
# connect() returns before the handshake: an empty XSUB has nothing to send until then.
time.sleep(0.3)
print("ready flood=connected", flush=True)
sent = 0
rounds = 10
for r in range(rounds):
    for c, s in enumerate(socks):
        for n in range(r * per_conn // rounds, (r + 1) * per_conn // rounds):
            s.send(b"\x01" + f"{tag}{c}-{n}".encode())
            sent += 1
    if pace_ms:
        time.sleep(pace_ms / 1000)
print(json.dumps({"sent": sent}), flush=True)
if close:
    # Default linger: term() waits until everything queued is written.
    for s in socks:
        s.setsockopt(zmq.LINGER, 10000)
        s.close()
    ctx.term()
    sys.exit(0)
while True:
    time.sleep(60)
