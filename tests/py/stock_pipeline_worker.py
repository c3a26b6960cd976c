"""A stock libzmq pipeline worker (pyzmq), as docs/pipeline.md describes the wire protocol:
PULL tasks, PUSH reports (with ZMTP heartbeats, and a JSON heartbeat report every 250 ms), SUB
control. Each task: accept, copy the input to the output after DELAY_MS, done. One slot.

Stops on the master's `stop`, or after LIMIT_S. Prints one JSON line: the unix ms of each done.

usage: stock_pipeline_worker.py TASKS RESULTS CONTROL NAME DELAY_MS LIMIT_S
"""
import json
import os
import shutil
import sys
import time

import zmq

tasks_ep, results_ep, control_ep, name = sys.argv[1:5]
delay, limit = int(sys.argv[5]) / 1000.0, float(sys.argv[6])
ctx = zmq.Context()
pull = ctx.socket(zmq.PULL)
pull.connect(tasks_ep)
push = ctx.socket(zmq.PUSH)
# libzmq's own liveness on the report link: a PING every 250 ms, the link dropped and
# reconnected when no PONG comes within 1 s; connects give up after 1 s and are retried.
push.setsockopt(zmq.HEARTBEAT_IVL, 250)
push.setsockopt(zmq.HEARTBEAT_TIMEOUT, 1000)
push.setsockopt(zmq.CONNECT_TIMEOUT, 1000)
push.setsockopt(zmq.RECONNECT_IVL, 100)
push.connect(results_ep)
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.connect(control_ep)


def report(kind, free, **kw):
    msg = dict(type=kind, worker=name, slots=1, free=free, heartbeat_ms=250, **kw)
    push.send(json.dumps(msg).encode())


report("hello", 1)
poller = zmq.Poller()
poller.register(pull, zmq.POLLIN)
poller.register(sub, zmq.POLLIN)
done = []
start = time.time()
beat = time.time()
stopped = False
while not stopped and time.time() - start < limit:
    for sock, _ in poller.poll(50):
        if sock is sub:
            if json.loads(sub.recv()).get("type") == "stop":
                stopped = True
        else:
            task = json.loads(pull.recv())
            report("accept", 0, batch=task["batch"], id=task["id"])
            time.sleep(delay)
            os.makedirs(os.path.dirname(task["output"]), exist_ok=True)
            shutil.copyfile(task["input"], task["output"])
            report("done", 1, batch=task["batch"], id=task["id"])
            done.append(int(time.time() * 1000))
    if time.time() - beat >= 0.25:
        beat = time.time()
        report("heartbeat", 1)
report("bye", 1)
push.close(linger=1000)
print(json.dumps({"done_unix_ms": done}), flush=True)
