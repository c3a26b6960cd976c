//! Interoperability with stock libzmq peers (pyzmq): the wire protocol of `docs/pipeline.md` is
//! plain PUSH/PULL with JSON frames. Without pyzmq these tests show as `ignored` (see `build.rs`);
//! under CI (`CI` set) they always run, and a missing pyzmq fails them.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;

use support::*;

/// Fails the test when pyzmq cannot be imported: a run that gets here means to test interop.
fn require_pyzmq() {
    let out = Command::new("python3")
        .args(["-c", "import zmq"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    assert!(
        out.status.success(),
        "pyzmq is required here (pip install pyzmq): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A pyzmq worker: PULL tasks from the master, PUSH reports, SUB control; copies each input to
/// its output, then waits for the master's `stop` (a heartbeat must have come before).
const PY_WORKER: &str = r#"
import json, shutil, sys, zmq
tasks_ep, results_ep, control_ep, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB); sub.setsockopt(zmq.SUBSCRIBE, b'{"type":"'); sub.connect(control_ep)
pull = ctx.socket(zmq.PULL); pull.connect(tasks_ep)
push = ctx.socket(zmq.PUSH); push.connect(results_ep)
def report(kind, **kw):
    push.send(json.dumps(dict(type=kind, worker="py", slots=1, free=1, heartbeat_ms=250, **kw)).encode())
report("hello")
for _ in range(total):
    if not pull.poll(60000):
        sys.exit("no task within 60 s")
    task = json.loads(pull.recv())
    assert set(task) >= {"batch", "id", "path", "filter", "input", "output"}, task
    report("accept", batch=task["batch"], id=task["id"])
    shutil.copyfile(task["input"], task["output"])
    report("done", batch=task["batch"], id=task["id"])
heard = set()
while "stop" not in heard:
    if not sub.poll(60000):
        sys.exit(f"no stop within 60 s, heard {heard}")
    heard.add(json.loads(sub.recv())["type"])
assert "heartbeat" in heard, heard
report("bye")
push.close(linger=5000)
print("served", total)
"#;

#[test]
#[cfg_attr(pyzmq_missing, ignore = "pyzmq is not installed (pip install pyzmq)")]
fn pyzmq_pull_reads_the_master_tasks() {
    require_pyzmq();
    let dir = Scratch::new("py-worker");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, 5, 24);
    std::fs::create_dir_all(output.join("nested")).unwrap();
    let (mut m, connect) = master(
        &input,
        &output,
        &["--filter", "grayscale", "--stop-workers"],
    );
    let eps: Vec<&str> = connect.split(',').collect();
    let mut py = Proc::spawn("python3", &["-c", PY_WORKER, eps[0], eps[1], eps[2], "5"]);
    assert!(m.wait().success(), "{}", m.stderr());
    let s = m.summary();
    assert_eq!(s["done"], 5, "{s}");
    assert_eq!(s["by_worker"]["py"], 5, "{s}");
    assert_outputs(&output, &expected);
    assert!(py.wait().success(), "python worker failed: {}", py.stderr());
}

/// A pyzmq master: binds PUSH and PULL, waits for the worker's hello, sends more tasks than the
/// worker has slots (so it must honour `defer`) and prints the answers as one JSON list.
const PY_MASTER: &str = r#"
import json, sys, zmq
inp, out = sys.argv[1], sys.argv[2]
ctx = zmq.Context()
push = ctx.socket(zmq.PUSH); tp = push.bind_to_random_port("tcp://127.0.0.1")
pull = ctx.socket(zmq.PULL); rp = pull.bind_to_random_port("tcp://127.0.0.1")
print(f"ready connect=tcp://127.0.0.1:{tp},tcp://127.0.0.1:{rp}", flush=True)
def recv():
    if not pull.poll(60000):
        sys.exit("no report within 60 s")
    return json.loads(pull.recv())
while recv()["type"] != "hello":
    pass
names = ["a.png", "b.jpg", "missing.png"]
tasks = [json.dumps(dict(batch="py", id=i, path=n, filter="grayscale,blur:1.0",
                         input=f"{inp}/{n}", output=f"{out}/{n}")).encode()
         for i, n in enumerate(names)]
for t in tasks:
    push.send(t)
answers = {}
while len(answers) < len(names):
    r = recv()
    if r["type"] == "defer":  # the worker was full: send that task again
        push.send(tasks[r["id"]])
    elif r["type"] in ("done", "failed"):
        answers[r["id"]] = r
print(json.dumps([answers[i] for i in range(len(names))]), flush=True)
"#;

#[test]
#[cfg_attr(pyzmq_missing, ignore = "pyzmq is not installed (pip install pyzmq)")]
fn pyzmq_push_feeds_a_worker() {
    require_pyzmq();
    let dir = Scratch::new("py-master");
    let (input, output) = (dir.path("in"), dir.path("out"));
    std::fs::create_dir_all(&output).unwrap();
    let colors = image::RgbImage::from_fn(20, 10, |x, _| image::Rgb([x as u8 * 10, 200, 30]));
    std::fs::create_dir_all(&input).unwrap();
    colors.save(input.join("a.png")).unwrap();
    colors.save(input.join("b.jpg")).unwrap();
    let mut py = Proc::spawn(
        "python3",
        &[
            "-c",
            PY_MASTER,
            input.to_str().unwrap(),
            output.to_str().unwrap(),
        ],
    );
    let connect = py.ready()["connect"].clone();
    let _w = worker(&connect, "rs", &[]);
    assert!(py.wait().success(), "python master failed: {}", py.stderr());
    let answers: serde_json::Value = py.summary();
    assert_eq!(answers[0]["type"], "done", "{answers}");
    assert_eq!(answers[1]["type"], "done", "{answers}");
    assert_eq!(answers[2]["type"], "failed", "{answers}");
    assert!(answers[2]["reason"]
        .as_str()
        .unwrap()
        .contains("missing.png"));
    assert_eq!(answers[0]["worker"], "rs");
    assert_eq!(files_under(&output), ["a.png", "b.jpg"]);
    let gray = image::open(output.join("a.png")).unwrap().to_rgb8();
    assert!(gray.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
}

/// A stock PULL that connects to the task port and never reads (a stuck stock worker, a stray
/// tool): it prints `connected` once its connection is up, then sleeps.
const PY_STRAY_PULL: &str = r#"
import sys, time, zmq
ctx = zmq.Context()
pull = ctx.socket(zmq.PULL); pull.connect(sys.argv[1])
print("connected", flush=True)
time.sleep(120)
"#;

/// Issue 19, case 2: a stock pyzmq PULL on the task port that never reads, beside one healthy
/// worker. On round robin it was dealt every other task, each held until the acknowledgement
/// window ran out or every task link was cut (26.5 s instead of 0.39 s for 100 images of
/// 768 px, 8 cuts, 16 re-sends). Dealt by credit, it gets nothing: the batch costs at most 1 s
/// more than the worker alone.
#[test]
#[cfg_attr(pyzmq_missing, ignore = "pyzmq is not installed (pip install pyzmq)")]
fn a_stray_stock_pull_that_never_reads_costs_the_batch_at_most_a_second() {
    require_pyzmq();
    let dir = Scratch::new("py-stray");
    let input = dir.path("in");
    let expected = samples(&input, 100, 128);
    let run = |name: &str, stray: bool| -> u64 {
        let output = dir.path(name);
        let (mut m, connect) = master(&input, &output, &["--filter", "invert", "--stop-workers"]);
        let tasks = connect.split(',').next().unwrap().to_string();
        let _stray = stray.then(|| {
            let mut py = Proc::spawn("python3", &["-c", PY_STRAY_PULL, &tasks]);
            py.wait_line("connected");
            py
        });
        let _w = worker(&connect, "w1", &[]);
        assert!(m.wait().success(), "master failed: {}", m.stderr());
        let s = m.summary();
        assert_eq!((count(&s, "done"), count(&s, "failed")), (100, 0), "{s}");
        assert_eq!(count(&s, "resent"), 0, "{s}");
        assert_outputs(&output, &expected);
        count(&s, "elapsed_ms")
    };
    let alone = run("alone", false);
    let beside = run("beside", true);
    eprintln!("100 images: {alone} ms alone, {beside} ms beside a stray stock PULL");
    assert!(
        beside <= alone + 1000,
        "the stray PULL cost more than a second: {beside} ms against {alone} ms"
    );
}
