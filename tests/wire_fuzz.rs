//! The lab's wire fuzzer (`lab fuzz`, [`lab::fuzz`]) against the guarded broker: thousands of
//! random and mutated ZMTP connections, after which it still serves every request and its
//! memory is back near where it started. Seeded, so that a failure can be replayed
//! (`WIRE_FUZZ_SEED`, or `lab fuzz --seed`).

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

async fn fuzz_broker(test: &str, config: FuzzConfig) -> Verdict {
    let _g = heavy().await;
    let lab = lab(test, PartitionMode::Relay);
    let target = fuzz::find("broker").expect("the broker is a fuzz target");
    let verdict = fuzz::run(&target, &lab, &config).await;
    eprintln!("{}", verdict.render());
    verdict
}

#[tokio::test(flavor = "multi_thread")]
async fn thousands_of_bad_connections_leave_the_broker_serving_and_flat() {
    let seed = seed();
    let v = fuzz_broker(
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
/// kills the broker, and the verdict says so.
#[tokio::test(flavor = "multi_thread")]
async fn without_the_guard_the_fuzzer_finds_the_broker_dead() {
    let v = fuzz_broker(
        "wire-fuzz-unguarded",
        FuzzConfig {
            seed: seed(),
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
