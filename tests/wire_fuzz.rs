//! The lab's wire fuzzer (`lab fuzz`, [`lab::fuzz`]) against the broker (its own ROUTERs, limits
//! always on), and the proxy and pipeline master behind the guard: thousands of random and
//! mutated ZMTP connections, after which each still serves (every request answered, updates
//! delivered, the whole batch done) and its memory is back near where it started; and against
//! the proxy without the guard, to show the fuzzer finds what the guard is for. Seeded, so that
//! a failure can be replayed (`WIRE_FUZZ_SEED`, or `lab fuzz --seed`).

use integration::{figure, heavy, lab};
use lab::fuzz::{self, FuzzConfig};
use lab::scenarios::PartitionMode;
use lab::verdict::Verdict;

fn seed() -> u64 {
    std::env::var("WIRE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(FuzzConfig::default().seed)
}

async fn fuzz_target(name: &str, test: &str, config: FuzzConfig) -> Verdict {
    let _g = heavy().await;
    let lab = lab(test, PartitionMode::Relay);
    let target = fuzz::find(name).expect("a fuzz target");
    let verdict = fuzz::run(&target, &lab, &config).await;
    eprintln!("{}", verdict.render());
    verdict
}

#[tokio::test(flavor = "multi_thread")]
async fn thousands_of_bad_connections_leave_the_broker_serving_and_flat() {
    let seed = seed();
    let v = fuzz_target(
        "broker",
        "wire-fuzz",
        FuzzConfig {
            seed,
            ..FuzzConfig::default()
        },
    )
    .await;
    assert!(v.passed, "seed {seed}: {}", v.render());
    assert_eq!(figure(&v, "connections"), 3000);
    assert!(figure(&v, "guard_refused") > 0, "{}", v.render());
}

/// The fuzzer finds what the guard is for: without it, a frame header announcing a huge size
/// kills the pipeline master (its sockets are zmq.rs's), and the verdict says so. (The proxy
/// was the example until its XSUB became our own: it survives the same run now.)
#[tokio::test(flavor = "multi_thread")]
async fn without_the_guard_the_fuzzer_finds_the_master_dead() {
    let v = fuzz_target(
        "pipeline",
        "wire-fuzz-unguarded",
        FuzzConfig {
            seed: seed(),
            connections: 1000,
            guard: "never".into(),
            ..FuzzConfig::default()
        },
    )
    .await;
    assert!(!v.passed, "{}", v.render());
    assert!(
        v.failures.iter().any(|f| f.contains("survives")),
        "{}",
        v.render()
    );
}

/// The same at the proxy (its XSUB and XPUB the proxy's own ZMTP code) and at a pipeline master
/// (its three sockets behind the guard), fewer connections each.
#[tokio::test(flavor = "multi_thread")]
async fn bad_connections_leave_the_proxy_and_the_master_serving_and_flat() {
    let seed = seed();
    for name in ["proxy", "pipeline"] {
        let v = fuzz_target(
            name,
            &format!("wire-fuzz-{name}"),
            FuzzConfig {
                seed,
                connections: 1000,
                ..FuzzConfig::default()
            },
        )
        .await;
        assert!(v.passed, "{name}, seed {seed}: {}", v.render());
        assert_eq!(figure(&v, "connections"), 1000);
        assert!(figure(&v, "guard_refused") > 0, "{}", v.render());
    }
}
