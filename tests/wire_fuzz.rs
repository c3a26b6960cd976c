//! The lab's wire fuzzer (`lab fuzz`, [`lab::fuzz`]) against the broker, the proxy and the
//! pipeline master, every socket of each our own ZMTP code with its limits always on: thousands
//! of random and mutated ZMTP connections, after which each still serves (every request
//! answered, updates delivered, the whole batch done) and its memory is back near where it
//! started; and against a master started with no flag at all, which the fuzzer used to kill.
//! Seeded, so that a failure can be replayed (`WIRE_FUZZ_SEED`, or `lab fuzz --seed`).

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

/// A pipeline master started with its default flags (on zmq.rs's sockets, `--guard auto` left
/// loopback unguarded, and the fuzzer killed it with SIGABRT: issue 19, case 1): it survives the
/// same run and then does its whole batch.
#[tokio::test(flavor = "multi_thread")]
async fn the_fuzzer_leaves_a_master_with_its_default_flags_serving() {
    let seed = seed();
    let v = fuzz_target(
        "pipeline",
        "wire-fuzz-defaults",
        FuzzConfig {
            seed,
            connections: 1000,
            default_limits: true,
            ..FuzzConfig::default()
        },
    )
    .await;
    assert!(v.passed, "seed {seed}: {}", v.render());
    assert_eq!(figure(&v, "images_done"), 12, "{}", v.render());
    assert!(figure(&v, "guard_refused") > 0, "{}", v.render());
}

/// The same at the proxy (its XSUB and XPUB the proxy's own ZMTP code) and at a pipeline master
/// (its PUSH, PULL and PUB our own too), fewer connections each.
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
