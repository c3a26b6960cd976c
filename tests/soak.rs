//! A short `lab soak`: the shared queue, the pipeline and pub/sub together under random faults
//! (a fixed seed), run as users run it. Its verdict must pass, with nothing lost or duplicated
//! and every long-lived process flat; and a soak that loses work must fail, exit status and all.

use std::time::Duration;

use integration::{bins, log_dir};
use lab::process::Proc;
use lab::verdict::Verdict;
use serde_json::Value;

/// Runs `lab soak` for `minutes` of faults; its exit status and verdict.
async fn soak(test: &str, minutes: &str, extra: &[&str]) -> (bool, Verdict) {
    let _g = integration::heavy().await;
    let logs = log_dir(test);
    let out = logs.join("out");
    let mut args: Vec<String> = [
        "--no-build",
        "--json",
        "--log-dir",
        &logs.display().to_string(),
        "soak",
        "--minutes",
        minutes,
        "--seed",
        "2026",
        "--out",
        &out.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut lab = Proc::spawn("lab", &bins().path("lab"), &args, &logs).expect("lab starts");
    let status = lab
        .wait(Duration::from_secs(300))
        .await
        .expect("lab soak ends");
    let verdict: Verdict = lab.json().expect("a JSON verdict");
    eprintln!("{}", verdict.render());
    for file in ["samples.csv", "report.json", "rss.svg"] {
        assert!(out.join(file).exists(), "{file} written");
    }
    (status.success(), verdict)
}

fn n(v: &Verdict, name: &str) -> u64 {
    v.figures
        .get(name)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("figure {name} missing: {}", v.render()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_soak_loses_nothing_and_stays_flat() {
    let (ok, v) = soak("soak", "0.5", &[]).await;
    assert!(v.passed && ok, "{}", v.render());
    assert!(n(&v, "faults") >= 3, "{}", v.render());
    assert!(n(&v, "requests_answered") > 0 && n(&v, "requests_lost") == 0);
    assert_eq!(n(&v, "requests_duplicated"), 0);
    assert!(n(&v, "images_done") > 0 && n(&v, "images_lost") == 0);
    assert_eq!(n(&v, "images_duplicated"), 0);
    assert!(n(&v, "updates_received") > 0);
    assert_eq!(n(&v, "updates_duplicated"), 0);
    let processes = v.figures["processes"].as_object().expect("processes");
    for p in ["broker", "sq-w1", "pw1", "proxy", "p1", "s1"] {
        assert!(processes.contains_key(p), "{p} sampled: {}", v.render());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_soak_that_loses_a_batch_fails() {
    let (ok, v) = soak("soak-sabotaged", "0.25", &["--sabotage", "kill-master"]).await;
    assert!(!v.passed && !ok, "{}", v.render());
    assert!(n(&v, "images_lost") > 0, "{}", v.render());
}
