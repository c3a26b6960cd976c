//! Filesystem side of a batch: listing the input tree, atomic output writes (temp file in the
//! same directory, then rename), and removing temp files a killed worker left behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Suffix of in-progress output files; they are hidden (leading dot) and never a final output.
pub const TEMP_SUFFIX: &str = ".pipeline-tmp";

/// Lists regular files under `root` (recursively, sorted, relative paths), skipping `skip` (the
/// output directory when it lies inside the input) and our own temp files.
pub fn list_files(root: &Path, skip: Option<&Path>) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if skip.is_some_and(|s| s == dir) {
            continue;
        }
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(path);
            } else if (kind.is_file() || kind.is_symlink()) && !is_temp(&path) {
                if let Ok(rel) = path.strip_prefix(root) {
                    out.push(rel.to_path_buf());
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

fn is_temp(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(TEMP_SUFFIX))
}

/// Writes `bytes` to `dest` so that readers see either no file or the whole file, also after a
/// crash of the host: a temp file next to it (same filesystem, so the rename is atomic), synced,
/// renamed over `dest`, and the directory synced so that the rename itself is on disk.
/// Two writers of the same `dest` (a task done twice after a re-send) each rename a complete
/// file: the last rename wins and there is still exactly one file.
pub fn write_atomic(dest: &Path, bytes: &[u8], writer_tag: &str) -> std::io::Result<()> {
    write_atomic_if(dest, bytes, writer_tag, || true).map(|_| ())
}

/// [`write_atomic`], but `keep` is asked just before the rename: when it says no (the output is
/// no longer wanted, e.g. its batch is over), the temp file is removed and `Ok(false)` returned.
pub fn write_atomic_if(
    dest: &Path,
    bytes: &[u8],
    writer_tag: &str,
    keep: impl FnOnce() -> bool,
) -> std::io::Result<bool> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("output");
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = parent.join(format!(
        ".{name}.{writer_tag}-{}-{n}{TEMP_SUFFIX}",
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        // Without it a crash can leave a renamed but empty or partial file: the rename may
        // reach the disk before the data.
        f.sync_all()?;
        if !keep() {
            std::fs::remove_file(&tmp)?;
            return Ok(false);
        }
        std::fs::rename(&tmp, dest)?;
        sync_dir(parent)?;
        Ok(true)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Whether `path` exists and was modified after `time`.
pub fn modified_after(path: &Path, time: std::time::SystemTime) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|m| m > time)
}

/// Makes a rename (or creation) in `dir` durable: the entry lives in the directory's own data.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Temp files under `root`: left by writers that died mid-write (or still writing).
pub fn temp_files(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(_) if is_temp(&path) => found.push(path),
                _ => {}
            }
        }
    }
    found
}

/// Removes temp files left in `root` by writers that died mid-write; returns how many.
pub fn remove_temp_files(root: &Path) -> usize {
    temp_files(root)
        .into_iter()
        .filter(|path| std::fs::remove_file(path).is_ok())
        .count()
}

/// Checks that `dir` exists or can be created and that files can be created in it.
pub fn check_writable(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".probe-{}{TEMP_SUFFIX}", std::process::id()));
    std::fs::File::create(&probe)?;
    std::fs::remove_file(&probe)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pipeline-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    #[test]
    fn atomic_write_leaves_one_file_and_no_temp() {
        let d = scratch("atomic");
        let dest = d.join("a/b/c.png");
        write_atomic(&dest, b"one", "w1").expect("write");
        write_atomic(&dest, b"two", "w2").expect("write again");
        assert_eq!(std::fs::read(&dest).expect("read"), b"two");
        assert_eq!(
            list_files(&d, None).expect("list"),
            vec![PathBuf::from("a/b/c.png")]
        );
        std::fs::write(d.join(format!(".x{TEMP_SUFFIX}")), b"half").expect("temp");
        assert_eq!(remove_temp_files(&d), 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn listing_skips_output_inside_input() {
        let d = scratch("skip");
        std::fs::create_dir_all(d.join("out")).expect("mkdir");
        std::fs::write(d.join("in.png"), b"x").expect("write");
        std::fs::write(d.join("out/old.png"), b"x").expect("write");
        let got = list_files(&d, Some(&d.join("out"))).expect("list");
        assert_eq!(got, vec![PathBuf::from("in.png")]);
        let _ = std::fs::remove_dir_all(&d);
    }
}
