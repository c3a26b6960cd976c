//! The broker's ROUTERs against peers that claim what is not theirs: a connection that names
//! itself after another client to take its replies, and a crowd of idle connections that
//! would use up the broker's descriptors. On the real binaries, with a stock libzmq victim.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::zmtp;
use integration::{bins, broker, client, heavy, log_dir, require_pyzmq, stop_broker, worker};
use lab::process::Proc;

fn script(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("py")
        .join(name)
        .display()
        .to_string()
}

fn address(endpoint: &str) -> String {
    endpoint.trim_start_matches("tcp://").to_string()
}

/// A stock DEALER with routing id `alice` sends a request a worker takes 1.5 s to answer; while
/// it is held, a raw peer connects to the frontend naming itself `alice` and listens. The thief
/// is refused and gets nothing; alice gets her reply. (With the takeover the router did before,
/// the reply went to the thief, and the two took the id from each other for as long as both
/// were up.)
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    no_pyzmq,
    ignore = "python3 with pyzmq was not installed when built (see tests/build.rs)"
)]
async fn nobody_takes_another_clients_replies_by_naming_itself_after_it() {
    require_pyzmq();
    let _g = heavy().await;
    let test = "router-thief";
    let (mut broker, frontend, backend) = broker(test, &[]).await;
    let mut w = worker(test, &backend, &["--work-ms", "1500"]);
    w.ready(Duration::from_secs(20))
        .await
        .expect("worker ready");
    let args = [
        script("named_dealer.py"),
        frontend.clone(),
        "alice".into(),
        "mine".into(),
    ];
    let mut victim = Proc::spawn(
        "alice",
        Path::new("python3"),
        &args,
        &log_dir("router-thief-alice"),
    )
    .expect("victim");
    lab::broker_stats::wait_for(
        &broker,
        Duration::from_secs(20),
        "alice's request held",
        |c| c.get("dispatched") == 1,
    )
    .await
    .expect("the worker holds alice's request");

    let addr = address(&frontend);
    let thief = tokio::task::spawn_blocking(move || {
        let mut peer = std::net::TcpStream::connect(addr).expect("connect");
        let hello = [zmtp::greeting(), zmtp::ready_as("DEALER", Some(b"alice"))].concat();
        peer.write_all(&hello).expect("handshake");
        peer.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        // Listens for 4 s, well past the worker's answer, or until closed.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let until = std::time::Instant::now() + Duration::from_secs(4);
        let mut closed = false;
        while std::time::Instant::now() < until {
            match peer.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        (got, closed)
    });
    let status = victim
        .wait(Duration::from_secs(30))
        .await
        .expect("victim ends");
    let (got, closed) = thief.await.expect("thief");
    let summary: serde_json::Value = victim.json().expect("victim's summary");
    assert!(
        !got.windows(4).any(|w| w == b"mine"),
        "the thief got alice's reply"
    );
    assert!(closed, "the thief's connection was not closed");
    assert_eq!(summary["reply"], "mine", "{}", victim.log_tail());
    assert_eq!(summary["disconnects"], 0, "alice lost her connection");
    assert!(status.success(), "{}", victim.log_tail());
    let counters = stop_broker(&mut broker).await;
    assert_eq!(counters.get("replies_out"), 1);
    assert!(counters.get("guard_refused") >= 1, "the claim was refused");
}

/// With the broker's open-files limit at 256, 300 idle connections that completed their
/// handshake are opened on the frontend and kept: a new client is still served, 5 of 5. At the
/// bound (96 a socket) the rest are closed at once, and a newcomer takes the place of one that
/// has been quiet for 2 s. (Before the bound, the descriptors ran out and every new client was
/// locked out for as long as the idle ones stayed.)
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_cannot_lock_new_clients_out() {
    let _g = heavy().await;
    let test = "router-connection-bound";
    let broker_path = bins().path("broker").display().to_string();
    let mut command = tokio::process::Command::new("prlimit");
    command.args([
        "--nofile=256:256",
        "--",
        &broker_path,
        "--frontend",
        "tcp://127.0.0.1:0",
        "--backend",
        "tcp://127.0.0.1:0",
        "--stats-secs",
        "1",
    ]);
    let mut broker = Proc::spawn_with("broker", &mut command, &log_dir(test)).expect("broker");
    let ready = broker
        .ready(Duration::from_secs(20))
        .await
        .expect("broker ready");
    let (frontend, backend) = (ready["frontend"].clone(), ready["backend"].clone());
    let mut w = worker(test, &backend, &[]);
    w.ready(Duration::from_secs(20))
        .await
        .expect("worker ready");

    let addr = address(&frontend);
    let idle = tokio::task::spawn_blocking(move || {
        let hello = [zmtp::greeting(), zmtp::ready("DEALER")].concat();
        (0..300)
            .filter_map(|_| {
                let mut peer = std::net::TcpStream::connect(&addr).ok()?;
                peer.write_all(&hello).ok()?;
                Some(peer)
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("idle connections");
    // The idle ones are quiet for long enough to give way.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let (summary, ok) = client(test, &frontend, 5, &["--deadline-secs", "20"]).await;
    assert_eq!(summary.answered, 5, "{summary:?}");
    assert!(ok);
    let counters = stop_broker(&mut broker).await;
    assert!(counters.get("evicted") >= 1, "a quiet connection gave way");
    assert!(counters.get("turned_away") >= 150, "{counters:?}");
    assert_eq!(counters.get("replies_out"), 5);
    drop(idle);
}
