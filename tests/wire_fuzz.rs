//! A wire-level fuzzer: thousands of random and mutated ZMTP connections thrown at a live
//! broker (its guard on), after which it still serves every request and its memory is back
//! near where it started. Seeded, so a failure can be replayed (`WIRE_FUZZ_SEED`).

use std::time::Duration;

use broker::BrokerStats;
use integration::{client, guarded_broker, heavy, zmtp_greeting};
use lab::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONNECTIONS: usize = 3000;
const AT_ONCE: usize = 32;

/// A well-formed DEALER session: greeting, READY, then a few requests.
fn session(rng: &mut StdRng) -> Vec<u8> {
    let mut s = zmtp_greeting();
    let mut ready = vec![5u8];
    ready.extend(b"READY");
    ready.push(11);
    ready.extend(b"Socket-Type");
    ready.extend(6u32.to_be_bytes());
    ready.extend(b"DEALER");
    s.extend([0x04, ready.len() as u8]);
    s.extend(ready);
    for i in 0..rng.gen_range(0..4) {
        let body = format!("fuzz {i}");
        s.extend([0x01, 0x00]);
        s.extend([0x00, body.len() as u8]);
        s.extend(body.as_bytes());
    }
    s
}

/// Random bytes, or a session with bytes flipped, cut, inserted or a frame header rewritten.
fn case(rng: &mut StdRng) -> Vec<u8> {
    let mut s = session(rng);
    match rng.gen_range(0..6) {
        0 => (0..rng.gen_range(1..300)).map(|_| rng.gen()).collect(),
        1 => {
            for _ in 0..rng.gen_range(1..6) {
                let at = rng.gen_range(0..s.len());
                s[at] = rng.gen();
            }
            s
        }
        2 => {
            s.truncate(rng.gen_range(0..s.len()));
            s
        }
        3 => {
            let at = rng.gen_range(0..s.len());
            let junk: Vec<u8> = (0..rng.gen_range(1..40)).map(|_| rng.gen()).collect();
            s.splice(at..at, junk);
            s
        }
        4 => {
            // A long frame header with a random size right after the handshake.
            s.push(rng.gen::<u8>() | 0x02);
            s.extend(rng.gen::<u64>().to_be_bytes());
            s
        }
        _ => {
            // Many frames with MORE set.
            for _ in 0..rng.gen_range(1..3000) {
                s.extend([0x01, 0x00]);
            }
            s
        }
    }
}

async fn throw(addr: String, bytes: Vec<u8>) {
    let Ok(Ok(mut stream)) =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr)).await
    else {
        return;
    };
    let _ = stream.write_all(&bytes).await;
    let mut sink = [0u8; 512];
    // Read what the broker says until it closes or a short while passes, then vanish.
    let _ = tokio::time::timeout(Duration::from_millis(100), async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread")]
async fn thousands_of_bad_connections_leave_the_broker_serving_and_flat() {
    let _g = heavy().await;
    let test = "wire-fuzz";
    let seed = std::env::var("WIRE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026_u64);
    let (mut broker, _worker, frontend, backend) = guarded_broker(test, 8).await;
    let warm = client(test, &frontend, 200, &["--concurrency", "8"])
        .await
        .0;
    assert_eq!(warm.answered, 200, "{warm:?}");
    let before = rss_kib(broker.pid());

    let mut rng = StdRng::seed_from_u64(seed);
    let targets = [
        frontend.trim_start_matches("tcp://").to_string(),
        backend.trim_start_matches("tcp://").to_string(),
    ];
    let mut thrown = 0;
    while thrown < CONNECTIONS {
        let batch: Vec<_> = (0..AT_ONCE)
            .map(|i| tokio::spawn(throw(targets[i % 2].clone(), case(&mut rng))))
            .collect();
        for t in batch {
            t.await.expect("fuzz task");
        }
        thrown += AT_ONCE;
    }

    let after_fuzz = client(test, &frontend, 200, &["--concurrency", "8"])
        .await
        .0;
    assert_eq!(after_fuzz.answered, 200, "seed {seed}: {after_fuzz:?}");
    let after = rss_kib(broker.pid());
    assert!(
        after < before + 16 * 1024,
        "seed {seed}: RSS grew from {before} KiB to {after} KiB"
    );
    broker.signal(Signal::SIGTERM).expect("signal");
    let status = broker.wait(Duration::from_secs(20)).await.expect("exits");
    assert!(status.success(), "seed {seed}: {}", broker.log_tail());
    let stats: BrokerStats = broker.json().expect("final stats");
    assert!(stats.guard_refused > 0, "{stats:?}");
    eprintln!("seed {seed}: {thrown} connections, RSS {before} -> {after} KiB, {stats:?}");
}
