"""A Lazy Pirate client (the ZeroMQ Guide's lpclient) in pyzmq, sending for a while and
recording when its replies stop and start again.

Usage: lazy_pirate.py ENDPOINT SECONDS [TIMEOUT_MS]. A REQ socket sends a sequence number,
waits TIMEOUT_MS (default 1000) for the same number back and, if none came, closes the socket,
opens a new one and sends the same request again (without the Guide's limit of 3 tries);
10 ms between requests. After SECONDS it prints one JSON line: {"answered", "retries",
"gaps": [[last reply before, first reply after], ...]} for every silence over 0.25 s, times in
seconds since the epoch (time.time()). Gives up on a request 30 s after SECONDS. Exits 0.
"""
import json
import sys
import time

import zmq

endpoint, seconds = sys.argv[1], float(sys.argv[2])
timeout_ms = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
context = zmq.Context()


def socket():
    client = context.socket(zmq.REQ)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(endpoint)
    return client


client = socket()
print("ready", flush=True)
end = time.time() + seconds
answered = retries = sequence = 0
last = time.time()
gaps = []
while time.time() < end:
    sequence += 1
    request = str(sequence).encode()
    client.send(request)
    while True:
        if client.poll(timeout_ms) & zmq.POLLIN:
            reply = client.recv_multipart()
            if reply[0] == request:
                now = time.time()
                if now - last > 0.25:
                    gaps.append([last, now])
                last = now
                answered += 1
                break
            continue
        retries += 1
        if time.time() > end + 30:
            break
        client.close()
        client = socket()
        client.send(request)
    time.sleep(0.01)
print(json.dumps({"answered": answered, "retries": retries, "gaps": gaps}), flush=True)
