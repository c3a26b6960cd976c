//! Issue 6, item 11: an output survives a crash of the host once it has its final name. Checked
//! on the system calls themselves: a helper test does one atomic write under `strace`, which must
//! show the temp file synced before the rename and the directory synced after it.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

const DIR_VAR: &str = "PIPELINE_DURABILITY_DIR";

/// One atomic write leaves the whole file and no temp file. Also the process that
/// `write_atomic_syncs_the_file_and_its_directory` runs under strace (in the directory it names).
#[test]
fn one_atomic_write() {
    let (dir, scratch) = match std::env::var_os(DIR_VAR) {
        Some(d) => (PathBuf::from(d), false),
        None => {
            let d = std::env::temp_dir().join(format!("pipeline-one-write-{}", std::process::id()));
            (d, true)
        }
    };
    let out = dir.join("out");
    pipeline::files::write_atomic(&out.join("a.png"), b"image bytes", "probe").unwrap();
    assert_eq!(std::fs::read(out.join("a.png")).unwrap(), b"image bytes");
    assert!(pipeline::files::temp_files(&out).is_empty());
    if scratch {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
#[cfg_attr(strace_missing, ignore = "strace is not installed")]
fn write_atomic_syncs_the_file_and_its_directory() {
    let dir = std::env::temp_dir().join(format!("pipeline-durability-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("strace.log");
    let status = Command::new("strace")
        .args([
            "-f",
            "-y",
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2",
            "-o",
        ])
        .arg(&log)
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "one_atomic_write", "--test-threads", "1"])
        .env(DIR_VAR, &dir)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run strace (required here): {e}"));
    assert!(status.success(), "the helper failed under strace");
    let trace = std::fs::read_to_string(&log).unwrap();
    let calls: Vec<&str> = trace
        .lines()
        .filter(|l| l.contains("fsync(") || l.contains("rename"))
        .collect();
    let out = dir.join("out");
    let file_sync = calls
        .iter()
        .position(|l| l.contains("sync(") && l.contains(".pipeline-tmp>"));
    let rename = calls.iter().position(|l| l.contains("rename"));
    let dir_sync = calls
        .iter()
        .position(|l| l.contains("sync(") && l.contains(&format!("<{}>", out.display())));
    let _ = std::fs::remove_dir_all(&dir);
    match (file_sync, rename, dir_sync) {
        (Some(f), Some(r), Some(d)) if f < r && r < d => {}
        _ => panic!(
            "expected fsync(temp) < rename < fsync(dir), got:\n{}",
            calls.join("\n")
        ),
    }
}
